"""Guards for GPU cost that run without a GPU: host synchronisations and device→host copies per denoising step.

On a GPU every ``.item()``, ``bool(tensor)``, ``nonzero`` or copy to the host stops the host until the device has
caught up, so a sync per attention layer costs a stall per layer and step (docs/gpu-cost.md). These tests count,
on the CPU, the calls that would be such a sync on a device, in whole runs of 2 and 4 steps on tiny models, and
bound the difference per step: NAG and VSF add none to the plain run's (a small constant of the loop's, whatever
the number of layers); attention capture adds at most one copy per stored dtype and step (its statistics are staged
on the device and copied together when the step ends), whatever the number of layers and branches — before that
change it made one copy per statistic, layer and branch (12–32 per step on these tiny models).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.session import Session
from negprompt.testing.tiny_chroma import build_tiny_chroma

PROMPT, NEGATIVE = "a photo of a cat", "red glasses"
HOST_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__"}  # a copy to the host, or a sync, on a device
# ``float``/``int`` of a tensor too: under inference mode they reach no dispatch mode, only their ``__float__``
# and ``__int__`` show (the loop's schedule conversions before the first step count per timestep with them)
SCALAR_METHODS = HOST_METHODS | {"__float__", "__int__"}
# what .item()/bool()/int() and data-dependent shapes dispatch to; ``torch.equal`` (a bool read off the device)
HOST_OPS = {"_local_scalar_dense", "nonzero", "equal"}
LOOP_SYNCS_PER_STEP = 2  # the loop's and the schedulers' own (a σ lookup, a timestep test), not the layers'
# Capture's copies to the host per step: one per dtype of the stored statistics (float32 statistics, float16 maps).
CAPTURE_COPIES_PER_STEP = 2


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that would stop the host on a device: Tensor methods copying to the host or reading a
    value (:data:`HOST_METHODS`, ``.to("cpu")``), and, through a dispatch mode, :data:`HOST_OPS`."""

    def __init__(self, methods: set[str] = HOST_METHODS) -> None:
        super().__init__()
        self.methods = methods
        self.counts: Counter[str] = Counter()
        counts = self.counts

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in HOST_OPS:
                    counts[f"aten.{func.overloadpacket.__name__}"] += 1
                return func(*args, **(kwargs or {}))

        self.dispatch = Dispatch()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and "cpu" in [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, str)]
        if name in self.methods or to_host:
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self.dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.dispatch.__exit__(*exc)


def per_step(run: Callable[[int], object], methods: set[str] = HOST_METHODS) -> Counter[str]:
    """The counts one more denoising step adds: (counts of a 4-step run − of a 2-step run) / 2 (encoding,
    scheduler set-up and decoding cancel)."""
    counted = {}
    for steps in (2, 4):
        with torch.no_grad(), HostSyncCounter(methods) as counter:
            run(steps)
        counted[steps] = counter.counts
    keys = set(counted[2]) | set(counted[4])
    return Counter({key: (counted[4][key] - counted[2][key]) / 2 for key in keys if counted[4][key] != counted[2][key]})


def runs(session: Session) -> dict[str, Callable[[int], object]]:
    """Plain at s = 1, NAG and VSF at s = 1, capture of rule (9), capture of NAG: each a function of the steps."""
    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})

    def spec(steps: int, negative: str | None = None, **options):
        return session.spec(PROMPT, negative, steps=steps, seeds=[0], size=32, **options)

    return {
        "plain": lambda steps: session.run(spec(steps, rule="cfg", scale=1.0)),
        "nag": lambda steps: session.run(spec(steps, NEGATIVE, rule="nag", scale=1.0)),
        "vsf": lambda steps: session.run(spec(steps, NEGATIVE, rule="vsf", scale=1.0)),
        "capture": lambda steps: capture(spec(steps, NEGATIVE), request, session, trace=False, reducer=reduce_layer),
        "capture-nag": lambda steps: capture(
            spec(steps, NEGATIVE, rule="nag", scale=1.0), request, session, trace=False, reducer=reduce_layer
        ),
    }


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sd3", "tiny-flux"])
def model(request) -> tuple[str, Session]:
    components = request.getfixturevalue(request.param.replace("-", "_"))
    return request.param, Session(components)


def test_nag_and_vsf_add_no_host_sync_per_step(model):
    name, session = model
    counted = {rule: per_step(run) for rule, run in runs(session).items() if rule in ("plain", "nag", "vsf")}
    assert sum(counted["plain"].values()) <= LOOP_SYNCS_PER_STEP, (name, counted["plain"])
    assert counted["nag"] == counted["plain"], (name, counted)
    assert counted["vsf"] == counted["plain"], (name, counted)


def test_capture_copies_to_the_host_once_per_dtype_and_step(model):
    name, session = model
    all_runs = runs(session)
    plain = sum(per_step(all_runs["plain"]).values())
    for rule in ("capture", "capture-nag"):
        counted = per_step(all_runs[rule])
        extra = sum(counted.values()) - plain
        assert 0 < extra <= CAPTURE_COPIES_PER_STEP, (name, rule, counted)
        assert set(counted) <= {"Tensor.cpu", "Tensor.__bool__", "Tensor.numpy", "Tensor.item", "aten.nonzero"}


def test_capture_reads_no_timestep_off_the_device(model):
    """Counting ``float``/``int`` of tensors too, capture adds only its copies per step: the hooks are told each
    step's timestep from one host copy of the schedule (before: ``float(t)`` of the device timestep per call)."""
    name, session = model
    all_runs = runs(session)
    plain = per_step(all_runs["plain"], SCALAR_METHODS)
    counted = per_step(all_runs["capture"], SCALAR_METHODS)
    assert 0 < sum(counted.values()) - sum(plain.values()) <= CAPTURE_COPIES_PER_STEP, (name, counted, plain)
    for scalar in ("Tensor.__float__", "Tensor.__int__"):  # the plain run's: σ and ᾱ of each timestep, up front
        assert counted[scalar] == plain[scalar], (name, counted, plain)


def test_chroma_nag_under_its_text_mask_adds_no_host_sync_per_step():
    session = Session(build_tiny_chroma(seed=0))
    all_runs = runs(session)
    plain, nag, vsf = (per_step(all_runs[rule]) for rule in ("plain", "nag", "vsf"))
    assert sum(plain.values()) <= LOOP_SYNCS_PER_STEP, plain
    assert nag == plain and vsf == plain, (plain, nag, vsf)


def test_the_counter_sees_each_kind_of_host_sync():
    x = torch.arange(4.0)
    with HostSyncCounter() as counter:
        x.sum().item(), bool(x.max() > 0), x.tolist(), x.cpu(), x.numpy(), x.to("cpu"), x.nonzero()
        torch.equal(x, x + 0)
    seen = set(counter.counts)
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "Tensor.to"} <= seen
    assert {"aten._local_scalar_dense", "aten.nonzero", "aten.equal"} <= seen


def test_the_bundled_demo_syncs_per_step_whatever_its_images():
    """The bundled model on a GPU (docs/gpu-cost.md): the demo's three runs together (no negative, negative, delayed
    negative; Euler ancestral, a noise draw per step from each image's CPU generator) read the device per step as a
    run alone does, plus at most one ``torch.equal`` while the delayed run may share the plain run's call — the same
    with 4 images as with 12, so nothing per image or per layer waits for the device."""
    from negprompt.interfaces.demo import demo_specs

    session = Session(None)
    counted = {}
    for seeds in ((0,), (0, 1, 2)):
        counted[len(seeds)] = per_step(
            lambda steps, seeds=seeds: session.run_together(demo_specs(session, seeds, steps))
        )
    assert counted[1] == counted[3], counted
    assert sum(counted[3].values()) <= LOOP_SYNCS_PER_STEP + 1, counted


def test_wan_two_experts_pick_their_expert_without_a_host_sync_per_step():
    """Wan 2.2's expert of each step is picked before the loop from one host copy of the timesteps: a run on two
    experts, plain or with NAG, syncs per step as a run on one (before: one ``float(t)`` per step in the family's
    ``denoise``, one more per call of a rule that prepares the denoiser)."""
    from negprompt.testing.tiny_wan import build_tiny_wan

    def wan_runs(session: Session) -> dict[str, Callable[[int], object]]:
        def spec(steps: int, negative: str | None = None, **options):
            return session.spec(PROMPT, negative, steps=steps, seeds=[0], size=32, frames=5, **options)

        return {
            "plain": lambda steps: session.run(spec(steps, rule="cfg", scale=1.0)),
            "nag": lambda steps: session.run(spec(steps, NEGATIVE, rule="nag", scale=1.0)),
        }

    one = wan_runs(Session(build_tiny_wan(seed=0)))
    two = wan_runs(Session(build_tiny_wan(seed=0, two_experts=True, boundary_ratio=0.7)))
    plain = per_step(one["plain"], SCALAR_METHODS)
    assert sum(plain.values()) <= LOOP_SYNCS_PER_STEP, plain  # σ and ᾱ of each timestep, before the loop
    counted = {rule: per_step(run, SCALAR_METHODS) for rule, run in two.items()}
    assert counted["plain"] == plain and counted["nag"] == plain, (counted, plain)
