"""Graphs for the tests: small MAX graphs around single ops for the op-level tests, and the
compile-once machinery of the whole suite.

A MAX compilation costs seconds of fixed cost on a CPU whatever the graph, so the suite
compiles as few as it can: each test file lists every graph it will compile in a
module-level GRAPHS (runtime.GraphSpec: op graphs made here, and the graphs of the
layers it builds, MoELayer.graph_specs), and conftest's session fixture compiles the
GRAPHS of every collected file together, in one MAX compilation
(runtime.compile_together). Tests then get their models from the in-process cache."""

from max.driver import CPU, Buffer
from max.graph import DeviceRef, Graph

import pymoe.ops as mops
from pymoe import runtime

DEVICE = CPU()
REF = DeviceRef.from_device(DEVICE)


def op_graph(name, input_types, forward, extra_kernels=()) -> runtime.GraphSpec:
    """A CPU graph taking `input_types`, outputting forward(*inputs) (a list of values), with
    pymoe's kernels and `extra_kernels` loaded; `name` must be unique in the suite."""

    def build(graph_name, module):
        with Graph(graph_name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR, *extra_kernels],
                   module=module) as g:
            g.output(*forward(*(v.tensor for v in g.inputs)))
        return g

    return runtime.GraphSpec(("test-graph", name), "cpu", build)


def graph_builder(name, build) -> runtime.GraphSpec:
    """A CPU graph that build(graph_name, module) makes (for graphs that op_graph's form does
    not fit, such as ones with buffer inputs)."""
    return runtime.GraphSpec(("test-graph", name), "cpu", build)


def layer_graphs(configs, **kwargs) -> list[runtime.GraphSpec]:
    """The graphs that MoELayer(config, weights, **kwargs) compiles, for each of `configs`."""
    from pymoe import MoELayer

    return [spec for config in configs for spec in MoELayer.graph_specs(config, **kwargs)]


def compiled(spec):
    """The compiled model of `spec`: from the cache when the session compiled it already."""
    return runtime.compiled(spec)[0]


def run(model, *arrays):
    return [o.to_numpy() for o in model.execute(*(Buffer.from_numpy(a) for a in arrays))]
