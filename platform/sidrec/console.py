"""What a person sees: one line per stage, a progress bar per long stage, results; Ray's own logs at Ray's level.

Library code only logs (``sidrec.*`` loggers). The CLI calls `setup(verbose)`, which decides what reaches the
terminal: by default the sidrec lines and warnings from everything else; Ray's INFO chatter, Ray Data's
bars, Hugging Face's loading bars and the output of Ray's worker processes stay in Ray's log files
(``/tmp/ray/session_latest/logs``). ``-v`` brings all of it back.

Work that runs inside Ray workers (encoder actors, the quantizer task, training rank 0, evaluation
actors) reports progress through a `ProgressSink`: a picklable handle to a tiny counter actor that the
driver polls to draw one tqdm bar (drawn only on a terminal). Outside the CLI, or without Ray, the sink
does nothing, so library calls never depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

_state = {"verbose": False, "progress": False}
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "filelock", "urllib3", "httpx")


def setup(verbose: bool = False) -> None:
    """Configure logging for a terminal session (called once by the CLI)."""
    _state.update(verbose=verbose, progress=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s" if verbose
                                           else "%(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("sidrec").setLevel(logging.INFO)
    if not verbose:
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # Hugging Face's loading bars
        # DeepSpeed resets its logger's level when imported (by transformers), but keeps its filters
        logging.getLogger("DeepSpeed").addFilter(_AtLeast(logging.ERROR))


def verbose() -> bool:
    return bool(_state["verbose"])


def ray_init_options() -> dict[str, Any]:
    """Options of ``ray.init`` for this session: workers' output reaches the driver only when verbose."""
    return {"log_to_driver": verbose() or not _state["progress"]}


def quiet_ray() -> None:
    """Ray's console handlers show errors only (Ray Data's file log keeps everything), Ray Data's bars and
    execution banners are off, unless verbose. Idempotent: called around ``ray.init`` and before each stage,
    since Ray Train and Serve add handlers of their own when first used."""
    if verbose() or not _state["progress"] or "ray" not in sys.modules:
        return
    from ray.data import DataContext  # importing Ray Data configures its loggers; quiet them after

    for name in QUIET_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _Counter:
    """Ray actor body: how far a stage's remote work has got (advanced by workers, read by the driver)."""

    def __init__(self) -> None:
        self.done, self.total = 0, None

    def advance(self, n: int = 1) -> None:
        self.done += n

    def set_total(self, total: int) -> None:
        self.total = total

    def read(self) -> tuple[int, int | None]:
        return self.done, self.total


class ProgressSink:
    """Picklable progress handle for remote code: ``sink.advance(n)``; a no-op without a counter."""

    def __init__(self, counter: Any = None):
        self._counter = counter

    def advance(self, n: int = 1) -> None:
        if self._counter is not None:
            self._counter.advance.remote(n)  # fire and forget: never waits on the driver

    def set_total(self, total: int) -> None:
        if self._counter is not None:
            self._counter.set_total.remote(total)


@contextlib.contextmanager
def progress(desc: str, total: int | None = None, unit: str = "it") -> Iterator[ProgressSink]:
    """A bar for remote work of one stage; yields the sink to hand to the workers."""
    import ray

    if not _state["progress"] or not ray.is_initialized():  # never start Ray just to draw a bar
        yield ProgressSink()
        return
    from tqdm import tqdm

    counter = ray.remote(num_cpus=0)(_Counter).remote()
    bar = tqdm(total=total, desc=f"  {desc}", unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
               mininterval=0.5, disable=None)  # None: drawn on a terminal only
    stop = threading.Event()

    def poll() -> None:
        while True:
            try:
                done, new_total = ray.get(counter.read.remote(), timeout=10)
            except Exception:  # the session is shutting down
                return
            if new_total is not None and bar.total != new_total:
                bar.total = new_total
            bar.update(done - bar.n)
            if stop.wait(0.5):
                return

    thread = threading.Thread(target=poll, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield ProgressSink(counter)
    finally:
        stop.set()
        thread.join(timeout=15)
        bar.close()
        ray.kill(counter)


@contextlib.contextmanager
def local_bar(desc: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
    """A bar for a loop on the driver (e.g. SASRec epochs); yields ``advance(n=1)``."""
    if not _state["progress"]:
        yield lambda n=1: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=f"  {desc}", unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
              disable=None) as bar:
        yield bar.update
