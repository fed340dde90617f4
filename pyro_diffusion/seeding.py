"""Seeding a run without disturbing the caller's random streams.

``torch.manual_seed`` seeds the CPU generator and every CUDA device's (and, while CUDA is not
yet initialised, queues that seeding for later), while ``torch.random.fork_rng`` restores
only the devices it is given. A seeded run that used both would leave the caller's other
generators reseeded. :func:`seeded` and :func:`manual_seed` touch only the generators the run
uses: the CPU's, and the run's own accelerator's.
"""

import contextlib

import torch

__all__ = ["forked", "manual_seed", "seeded"]


def _accelerator(device):
    """``device`` as a ``torch.device`` when it is not the CPU, else ``None``."""
    if device is None:
        return None
    device = torch.device(device)
    return None if device.type == "cpu" else device


def manual_seed(seed, device=None):
    """Seed the CPU generator and, when ``device`` is a CUDA or MPS device, that device's
    generator with ``seed``; no other device's (other backends: every device, as
    ``torch.manual_seed``). On the CPU the stream is the one ``torch.manual_seed(seed)``
    gives.

    :param int seed: the seed.
    :param device: the run's device (default: the CPU only).
    """
    seed = int(seed)
    torch.default_generator.manual_seed(seed)
    device = _accelerator(device)
    if device is None:
        return
    if device.type == "cuda":
        torch.cuda.init()  # else the seeding is queued, for whichever GPU is current later
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
    else:  # other backends: torch's own seeding of every device
        torch.manual_seed(seed)


@contextlib.contextmanager
def forked(device=None):
    """Restore the states of the CPU generator and ``device``'s after the block.

    :param device: the run's device (default: the CPU only).
    """
    device = _accelerator(device)
    cuda = device is not None and device.type == "cuda"
    mps_state = torch.mps.get_rng_state() if device is not None and device.type == "mps" \
        else None
    try:
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            yield
    finally:
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


@contextlib.contextmanager
def seeded(seed, device=None):
    """Run the block with the CPU generator and ``device``'s seeded by ``seed``
    (:func:`manual_seed`) and restore both states afterwards (:func:`forked`); with
    ``seed=None`` leave every generator alone.

    :param seed: the seed, or ``None``.
    :param device: the run's device (default: the CPU only).
    """
    if seed is None:
        yield
        return
    with forked(device):
        manual_seed(seed, device)
        yield
