"""Whether a streamed calibration will fit in host memory, told after its first layer rather than hours later."""

from __future__ import annotations

from pathlib import Path

from ..progress import Reporter


def available_host_memory() -> int | None:
    """Bytes the kernel could give this process now (Linux MemAvailable); None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def covariances_too_big(layer_inputs: int, layer_covariances: int, num_layers: int, reporter: Reporter) -> bool:
    """Given one layer's inputs and covariances held in host memory (bytes; 0 for those kept in files),
    whether every layer's covariances would not fit next to every layer's inputs.

    True: they are then recomputed while A is built. Warns when the layer inputs alone will not fit either
    (only --offload-dir helps then).
    """
    available = available_host_memory()
    if available is None:
        return False
    inputs, needed = layer_inputs * num_layers, layer_covariances * num_layers
    recompute = needed > 0 and needed + inputs > 0.8 * available
    if recompute:
        reporter.info(
            f"the covariances of all {num_layers} layers would take {needed / 1e9:.3g} GB of the "
            f"{available / 1e9:.3g} GB of host memory available: each layer's is computed again while A is "
            "built (one more forward pass); --offload-dir DIR keeps them on disk instead"
        )
    if inputs > 0.8 * available:
        reporter.warn(
            f"the layer inputs will take about {inputs / 1e9:.3g} GB of host memory and {available / 1e9:.3g} GB "
            "is available: if this run is killed, rerun with --offload-dir DIR on a disk with that much free space"
        )
    return recompute
