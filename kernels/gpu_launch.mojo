# Programmatic dependent launch (PDL, Hopper and newer): how the ops' GPU
# kernels follow one another on the stream.
#
# A decode layer is seven small kernels (router GEMV, gate, dispatch, two
# grouped GEMMs, combine), each a few microseconds, so the time between one
# kernel's end and the next one's start counts. Every kernel here is launched
# with pdl_attributes() and begins with pdl_begin(): it first waits until the
# kernel before it on the stream has finished and its writes are visible
# (griddepcontrol.wait), then lets the kernel after it be scheduled
# (griddepcontrol.launch_dependents). That next kernel's blocks can then be
# made resident while this one runs (on SMs it leaves idle, e.g. in its last
# wave), and they wait in their own pdl_begin() before touching memory: the
# ordering is the stream's as before, only the launch latency overlaps. A
# kernel launched after one that never triggers (MAX's own, cuBLAS) starts
# when that one ends, as without PDL. Off Hopper both are no-ops and the
# attribute list is empty.
from max.gpu.host.launch_attribute import LaunchAttribute
from max.gpu.primitives.grid_controls import (
    PDLLevel,
    launch_dependent_grids,
    pdl_launch_attributes,
    wait_on_dependent_grids,
)


@always_inline
def pdl_begin():
    """The first statement of every GPU kernel of the ops (see above): wait
    for the kernel before, then release the kernel after. Every thread of a
    block calls it, before any global memory access."""
    wait_on_dependent_grids()
    launch_dependent_grids()


@always_inline
def pdl_attributes() -> List[LaunchAttribute]:
    """The launch attributes of every GPU kernel of the ops (empty off Hopper)."""
    return pdl_launch_attributes(PDLLevel.ON)
