"""Compile small MAX graphs around single ops for the op-level tests."""

from max.driver import CPU, Buffer
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph

import pymoe.ops as mops

DEVICE = CPU()
REF = DeviceRef.from_device(DEVICE)


def compile_graph(name, input_types, forward, extra_kernels=()):
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR, *extra_kernels]) as g:
        outs = forward(*(v.tensor for v in g.inputs))
        g.output(*outs)
    return InferenceSession(devices=[DEVICE]).load(g)


def run(model, *arrays):
    return [o.to_numpy() for o in model.execute(*(Buffer.from_numpy(a) for a in arrays))]
