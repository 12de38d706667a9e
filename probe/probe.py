"""The Probe: attach to a model, sample training steps, learn per-site statistics and FP8 error.

Two lines in an existing loop::

    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=50)))
    for step, batch in enumerate(loader):
        with probe.step(step):              # hooks only on sampled steps
            loss = loss_fn(model(batch))
            loss.backward()
            opt.step(); opt.zero_grad()
    report = probe.report()                 # ProbeReport: .to_json / .to_markdown / .to_html

``probe.step(step)`` also works without ``with``: the next call (or ``probe.finish()``,
or ``probe.report()``) closes the previous step. What it supports:

- **autocast**: operands are captured in the dtype the GEMM ran in (bf16 under autocast).
- **gradient accumulation**: every forward/backward pair inside the step is one
  micro-batch; statistics merge over micro-batches, and the step's error observation
  is the mean over them.
- **torch.compile**: hooks are attached to the original module. Dynamo does not see
  hooks added after compilation, so run sampled steps through ``probe.select(model)``,
  which returns the original (eager) module on sampled steps and ``model`` otherwise.
- **DDP**: each rank probes its own shard; ``probe.reduce()`` (a collective: call it
  on every rank) merges statistics and error observations across ranks.

The probe never changes numerics: hooks only read (detached copies of) tensors. Its cost
is bounded by the schedule, by ``capture_rows`` / ``max_rows`` and, optionally, by
``overhead_budget`` (see :mod:`loka.probe.overhead`); ``probe.overhead`` reports it.

**Background analysis** (``ProbeConfig(background=True)``, the default): when a sampled
step ends, the hooks come off and the analysis of what they captured (statistics, FP8
errors of every candidate, decisions) runs on one worker thread while training goes on;
the training thread only copies operands in the hooks. Results are the same as in the
foreground (same operations, same seeded row samples, same order): everything that
reads them (``state``, ``report``, ``reduce``, the next due sample, which needs the
decisions) first waits for the analysis in flight, which after a few training steps has
long finished. On CPU this moves the analysis to another core; it helps the wall time
when training leaves a core free (say, one training thread on a 2-core machine) and costs
CPU time all the same (``probe.overhead["background_s"]``). ``background=False`` runs the
analysis in ``finish`` on the training thread.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from loka.progress import progress_bar
from loka.probe.build import build_report
from loka.probe.capture import StepCapture, install
from loka.probe.config import ProbeConfig
from loka.probe.capture_matmul import install_matmul, matmul_params
from loka.probe.census import CensusHooks
from loka.probe.distributed import reduce_probe
from loka.probe.error import t_quantile
from loka.probe.fit import fit_values
from loka.probe.overhead import OverheadClock
from loka.probe.sensitivity import site_sensitivity
from loka.probe.site_state import SiteState
from loka.probe.sites import Site, fqn_matches, find_sites, unwrap_compiled
from loka.probe.timing import time_site
from loka.recipe import Recipe


def _kept(fqn: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (not include or fqn_matches(fqn, include)) and not (exclude and fqn_matches(fqn, exclude))


class _StepScope:
    """Returned by :meth:`Probe.step`; a context manager, truthy when the step is sampled."""

    def __init__(self, probe: "Probe", active: bool) -> None:
        self._probe, self.active = probe, active

    def __bool__(self) -> bool:
        return self.active

    def __enter__(self) -> "_StepScope":
        return self

    def __exit__(self, *exc) -> None:
        self._probe.finish()


class Probe:
    """Per-site operand statistics and FP8 error of ``model`` learned on sampled steps."""

    def __init__(self, model: nn.Module, config: ProbeConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs an nn.Module, got {type(model).__name__}")
        self.config = config or ProbeConfig()
        self.model = model
        self.root = unwrap_compiled(model)
        found = find_sites(self.root, self.config.include, self.config.exclude)
        # x @ W on a 2-D parameter: sites found when they run (loka.probe.capture_matmul)
        self._matmul_params = {i: fqn for i, (fqn, _) in matmul_params(self.root).items()
                               if _kept(fqn, self.config.include, self.config.exclude)}
        if not found and not self._matmul_params:
            raise ValueError(
                "no GEMM sites found (no nn.Linear, 1x1 Conv1d, loka GEMM module or 2-D parameter matched); "
                f"check include/exclude patterns include={self.config.include} exclude={self.config.exclude}"
            )
        self.modules: dict[str, nn.Module] = {fqn: m for fqn, (_, m) in found.items()}
        self._state: dict[str, SiteState] = {fqn: SiteState(site) for fqn, (site, _) in found.items()}
        self.recipes: list[Recipe] = self.config.recipes()
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate recipes need distinct names, got {names}")
        self.sampled_steps: list[int] = []
        self.deferred_steps: list[int] = []  # due by the schedule, postponed by the overhead budget
        self._capture: StepCapture | None = None
        self._due = False
        self._clock = OverheadClock()
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.sensitivity: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        self._census: CensusHooks | None = None  # every GEMM of one step (see loka.probe.census)
        self._matmul_mode = None
        # Import scipy's t distribution now (about a second, once) rather than inside the
        # training loop at the second sampled step, where it would count as probe overhead.

        t_quantile(0.5 + self.config.confidence / 2, max(self.config.min_samples - 1, 1))

    @property
    def state(self) -> dict[str, SiteState]:
        """fqn -> what the probe learned at that site (waits for a background analysis in flight)."""
        self.wait()
        return self._state

    def wait(self) -> None:
        """Block until the background analysis of the last sampled step (if any) is done.

        Re-raises an exception the analysis raised. Called by everything that reads results.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            with self._clock.waiting():
                pending.result()

    @property
    def sites(self) -> dict[str, Site]:
        return {fqn: s.site for fqn, s in self.state.items()}

    def active_sites(self) -> dict[str, nn.Module]:
        """Module sites still being sampled (decided sites stop when ``stop_when_decided``)."""
        return {fqn: self.modules[fqn] for fqn, s in self.state.items() if not s.done and fqn in self.modules}

    def _active_matmuls(self) -> dict[int, str]:
        """``x @ W`` parameters still to sample: not yet seen, or seen and not done."""
        state = self.state  # waits: decisions
        return {i: fqn for i, fqn in self._matmul_params.items() if fqn not in state or not state[fqn].done}

    def _anything_open(self) -> bool:
        return bool(self.active_sites()) or (bool(self._matmul_params) and not self.sampled_steps) or any(
            fqn in self._state for fqn in self._active_matmuls().values())

    @property
    def done(self) -> bool:
        """True when no further step will be sampled (schedule exhausted or all sites decided)."""
        return len(self.sampled_steps) >= self.config.schedule.max_samples or not self._anything_open()

    def wants(self, step: int) -> bool:
        """Whether ``step`` will be sampled: due by the schedule (or deferred) and within the budget."""
        if len(self.sampled_steps) >= self.config.schedule.max_samples:
            return False
        due = self._due or self.config.schedule.wants(step, len(self.sampled_steps))
        # Only a due step needs the decisions (and so waits for a background analysis).
        if not due or not self._anything_open():
            return False
        if not self._clock.affordable(self.config.overhead_budget):
            if not self._due:
                self.deferred_steps.append(step)
            self._due = True
            return False
        return due

    def step(self, step: int) -> _StepScope:
        """Start training step ``step``: hooks are installed only when it is sampled."""
        self.finish()
        self._clock.mark()
        if not self.wants(step):
            return _StepScope(self, False)
        self._due = False
        self._capture = install(self.active_sites(), step, self.config.capture_rows, self.config.seed)
        self._matmul_mode = install_matmul(self.root, self._capture, self._active_matmuls())
        if self._census is None:
            self._census = CensusHooks(self.root)
        return _StepScope(self, True)

    @property
    def census(self):
        """The :class:`~loka.probe.census.GemmCensus` of the first sampled step (None before it ends)."""
        return None if self._census is None else self._census.result

    def finish(self) -> None:
        """End the current step: remove hooks and fold what was captured into the state.

        With ``background=True`` the folding runs on the worker thread (see the module doc).
        """
        capture, self._capture = self._capture, None
        if capture is None:
            return
        capture.remove_hooks()
        if self._census is not None and self._census.result is None:
            self._census.close(probed=set(capture.records))  # probed: what was captured, not what was hoped
        if not capture.records:
            return
        self.sampled_steps.append(capture.step)
        if not self.config.background:
            with self._clock.probe_work(hook_seconds=capture.hook_seconds):
                self._analyze(capture)
            return
        self.wait()  # at most one analysis in flight (the previous one is normally long done)
        with self._clock.probe_work(hook_seconds=capture.hook_seconds):
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loka-probe")
            self._pending = self._worker.submit(self._analyze_in_background, capture, _capture_stream(capture))

    def _analyze_in_background(self, capture, stream) -> None:
        t0 = time.perf_counter()
        try:
            # On a GPU the analysis goes on the stream the captures were made on, so it is
            # ordered after the copies (a new thread would otherwise use the default stream).
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._analyze(capture)
        finally:
            self._clock.add_background(time.perf_counter() - t0)

    def _analyze(self, capture) -> None:
        """Fold one sampled step's records into the sites' states and decide what can be decided."""
        # Grad mode and autocast are per thread: the analysis runs in full precision without
        # autograd whichever thread runs it and whatever context the training loop is in.
        with torch.no_grad(), _autocast_off(capture):
            for fqn, records in capture.records.items():
                if fqn not in self._state:  # an x @ W site seen for the first time
                    k, n = records[0].w.shape[1], records[0].w.shape[0]
                    self._state[fqn] = SiteState(Site(fqn, "matmul", int(k), int(n)))
                st = self._state[fqn]
                # A (site, recipe) already decided is not measured again (its interval is final).
                recipes = st.open_recipes(self.recipes, self.config) if self.config.stop_when_decided else self.recipes
                st.update(capture.step, records, recipes, self.config)
                if self.config.stop_when_decided and st.decided(self.config):
                    st.done = True

    def close(self) -> None:
        """Wait for the analysis in flight and stop the worker thread (``report`` still works)."""
        self.finish()
        self.wait()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    @property
    def overhead(self) -> dict:
        """Seconds spent in the probe (hooks + analysis) and in training between ``step`` calls."""
        return self._clock.summary()

    @property
    def sampling(self) -> bool:
        """Whether the current step is being sampled (hooks installed)."""
        return self._capture is not None

    def select(self, model: nn.Module) -> nn.Module:
        """The module to run this step: the original eager module while sampling, else ``model``.

        For ``torch.compile``'d models, whose compiled graph does not run hooks added later.
        """
        return unwrap_compiled(model) if self.sampling else model

    def measure_sensitivity(self, loss_fn, recipes=None, *, batches=None, seed: int = 0, progress: bool = False) -> dict:
        """Loss change from injecting one site's emulated FP8 fprop at a time (see loka.probe.sensitivity).

        ``loss_fn(batch)`` computes the loss of ``self.model`` on a batch and is evaluated on each
        of ``batches`` (at least 2, for an interval; 4-8 held-out batches are typical). A list of
        closures ``[lambda: ..., ...]`` without ``batches`` works too. Stored in the report.
        """

        self.finish()
        fns = loss_fn if batches is None else [lambda b=b: loss_fn(b) for b in batches]
        for recipe in recipes or self.recipes:
            res = site_sensitivity(self.modules, fns, recipe, seed=seed, confidence=self.config.confidence,
                                   progress=progress)
            for fqn, entry in res.items():
                self.sensitivity.setdefault(fqn, {})[getattr(recipe, "name", recipe)] = entry
        return self.sensitivity

    def time_sites(self, *, device=None, kernels=None, dtype=None, warmup: int = 5, iters: int = 20,
                   progress: bool = False) -> dict:
        """Time every candidate kernel at each observed site's shape (median M) vs bf16; stored in the report.

        Inputs are drawn from the operands' fitted distributions. On CPU the timings are
        recorded but flagged not representative.
        """


        self.finish()
        dev = torch.device(device or "cpu")
        # bf16 GEMMs on CPU are emulated and slow: time CPU runs in float32 (not representative anyway).
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        items = [(f, s) for f, s in self.state.items() if s.m_values]
        if progress:
            items = progress_bar(items, desc="timing sites", leave=False)
        for fqn, st in items:
            fits = {role: fs[0] for role, v in st.samples.items() if (fs := fit_values(v))}
            m = sorted(st.m_values)[len(st.m_values) // 2]
            self.timings[fqn] = time_site((m, st.site.in_features, st.site.out_features), self.recipes,
                                          kernels=kernels, with_reference=True, dtype=dtype, device=dev, fits=fits,
                                          warmup=warmup, iters=iters).to_dict()
        return self.timings

    def reduce(self, group=None) -> None:
        """Merge statistics and error observations across ranks (a collective; call on every rank)."""

        self.finish()
        reduce_probe(self, group)

    def report(self, **meta):
        """A :class:`~loka.probe.report.ProbeReport` of everything learned so far."""

        self.finish()
        return build_report(self, **meta)


def _capture_device(capture) -> torch.device:
    """The device the captured tensors are on (CPU when nothing was captured)."""
    for records in capture.records.values():
        if records:
            return records[0].x.device
    return torch.device("cpu")


def _capture_stream(capture):
    """The current CUDA stream of the captured tensors' device, or None off CUDA."""
    device = _capture_device(capture)
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _autocast_off(capture):
    """A context with autocast disabled on the captured tensors' device type."""
    return torch.autocast(_capture_device(capture).type, enabled=False)
