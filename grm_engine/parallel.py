"""Data-parallel `score` and `eval`: one process (rank) per device, each with its own Decoder, under `torchrun`
(or `grm-engine score --devices 0,1`, which runs torchrun's own launcher on those devices).

Every chunk of --chunk-size examples is dealt round-robin to the ranks (example i of the chunk goes to rank
i % world); each rank scores its shard in one decoder run, and rank 0 gathers the shards' ScoreResults and merges
them back into input order, so the rest of the command (writing the results file, voting, metrics) is the
one-process code. A sample does not depend on the world size: permutations and sampling noise are keyed by
(seed, example id, ...) (grm_engine/grm.py); only floating-point effects of a different batch composition can
change a token, and on the CPU none were seen.

Failures. A rank's exception while scoring a chunk (or during the checks before any model loads) is sent to every
rank instead of its result; every rank then raises RankFailure, rank 0 prints the first failing rank's error, and
all exit with the status one process would have had (2 for a usage error, 1 otherwise). Nothing of that chunk
is written. A rank that dies outright (killed, out of memory) is noticed by its launcher, which stops the others
(torchrun: SIGTERM, which a rank turns into KeyboardInterrupt so rank 0 ends on a whole line); without such a
launcher the others see the lost connection at their next exchange, or give up after GRM_ENGINE_RANK_TIMEOUT
seconds (default 1800: longer than the slowest rank may lag behind at a chunk's end).

Ranks exchange Python objects on the host only, so the process group is gloo on the GPU too: NCCL would copy
every object through the GPU and notice a dead peer only through its watchdog.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import traceback
from dataclasses import replace

TIMEOUT_ENV = "GRM_ENGINE_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


class RankFailure(Exception):
    """A rank failed: every rank raises this, with the failing rank's message and the exit status to use.
    lost: the exchange itself failed (a rank died or timed out): nobody may be left to print, so every rank prints."""

    def __init__(self, rank: int, status: int, message: str, details: str = "", lost: bool = False):
        super().__init__(message)
        self.rank, self.status, self.message, self.details, self.lost = rank, status, message, details, lost


def exit_status(error: BaseException) -> int:
    """The status one process exits with for this error: 2 for a usage error (exit_status = 2), 1 otherwise."""
    return getattr(error, "exit_status", 1)


def parse_devices(text: str, device: str | None = None, world: int = 1) -> list[str]:
    """--devices "0,1" -> ["cuda:0", "cuda:1"]; "cpu,cpu" -> two CPU processes (for tests). ValueError for a
    list that is not one, or --devices with --device or under a launcher."""
    if device:
        raise ValueError("give --device (one device) or --devices (several), not both")
    if world > 1:
        raise ValueError(f"--devices under a launcher (WORLD_SIZE={world}): the launcher already started one process "
                         "per device; drop --devices")
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--devices {text!r}: give comma-separated CUDA device indices, e.g. 0,1")
    if all(item == "cpu" for item in items):
        return ["cpu"] * len(items)
    if not all(item.isdigit() for item in items):
        raise ValueError(f"--devices {text!r}: give CUDA device indices (0,1,...) or cpu,cpu,... (one process each)")
    if len(set(items)) != len(items):
        raise ValueError(f"--devices {text!r}: a device is listed twice")
    import torch

    visible = torch.cuda.device_count()
    if max(int(item) for item in items) >= visible:
        raise ValueError(f"--devices {text!r}: this machine shows {visible} CUDA devices"
                         + ("" if visible else " (give --devices cpu,cpu,... for CPU processes)"))
    return [f"cuda:{item}" for item in items]


class Ranks:
    """The processes of one data-parallel run (rank 0 of 1 without a launcher: every method is then a no-op or a
    plain call, so one process runs exactly the code it ran before)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.world, self.local_rank, self.timeout_s = rank, world, local_rank, timeout_s
        self._group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        """Read the launcher's RANK / WORLD_SIZE / LOCAL_RANK (torchrun, deepspeed); none: one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        timeout = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={timeout!r}: give seconds, e.g. 1800") from None
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), timeout_s)

    def device(self, requested: str | None) -> str | None:
        """This rank's device: cuda:LOCAL_RANK when --device is cuda or unset and CUDA exists; cpu when asked."""
        if self.world == 1:
            return requested
        import torch

        if requested not in (None, "cuda", "cpu"):
            raise ValueError(f"--device {requested}: with {self.world} processes each takes cuda:LOCAL_RANK; give "
                             "--device cuda (or cpu), and pick the GPUs with CUDA_VISIBLE_DEVICES or --devices")
        if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
            return "cpu"
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available on this machine")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {self.local_rank} has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def start(self) -> None:
        """Join the process group (several ranks only); SIGTERM (a launcher stopping the run) becomes
        KeyboardInterrupt, which ends the current line before the process exits."""
        if self.world == 1 or self._group:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        self._group = True
        signal.signal(signal.SIGTERM, _interrupt)

    def close(self) -> None:
        if not self._group:
            return
        import torch.distributed as dist

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        self._group = False

    # ---- exchanges (collective: every rank calls them in the same order)
    def _collective(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # gloo: a peer closed the connection, or the timeout passed
            raise RankFailure(self.rank, 1, f"rank {self.rank} lost contact with the other ranks ({e}); another rank "
                              f"died or was killed, or did not answer within {self.timeout_s:.0f} s ({TIMEOUT_ENV})",
                              lost=True) from None

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed; if any did, every rank raises RankFailure with the lowest failing
        rank's error. One process: the error itself is raised, unchanged."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None
        if error is not None:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            mine = (exit_status(error), str(error) if exit_status(error) == 2 else f"{type(error).__name__}: {error}",
                    details)
        reports = [None] * self.world
        self._collective(dist.all_gather_object, reports, mine)
        for rank, report in enumerate(reports):
            if report is not None:
                raise RankFailure(rank, *report)

    @contextlib.contextmanager
    def together(self):
        """A block every rank runs: an exception on any rank is raised as RankFailure on every rank at its end."""
        error = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 (sent to the other ranks, then raised again)
            error = e
        self.agree(error)

    def share(self, value):
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        self._collective(dist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self._collective(dist.barrier)

    def score(self, chunk: list, score_shard):
        """score_shard(examples) -> ScoreResult on this rank's shard of `chunk`; -> the chunk's ScoreResult in
        input order on rank 0, None on the others."""
        if self.world == 1:
            return score_shard(chunk)
        import torch.distributed as dist

        shard = chunk[self.rank::self.world]
        result = None
        with self.together():
            if shard:
                result = replace(score_shard(shard), token_ids=None)  # ids stay here: eval and score do not use them
        parts = [None] * self.world if self.is_main else None
        self._collective(dist.gather_object, result, parts, 0)
        return merge_round_robin(parts, len(chunk)) if self.is_main else None


def report_failure(command: str, ranks: Ranks, failure: RankFailure) -> int:
    """Rank 0 prints the failing rank's error (every rank prints a lost connection: rank 0 may be gone), then the
    ranks wait for each other, so that no launcher stops rank 0 before it has printed -> the exit status."""
    if ranks.is_main or failure.lost:
        where = f"rank {failure.rank}: " if failure.rank != 0 else ""
        if failure.status == 2:
            print(f"{command}: error: {where}{failure.message}", file=sys.stderr)
        elif failure.lost:
            print(f"{command}: {failure.message}", file=sys.stderr)
        else:
            print(failure.details, end="", file=sys.stderr)
            print(f"{command}: rank {failure.rank} failed: {failure.message}", file=sys.stderr)
    if not failure.lost:
        with contextlib.suppress(RankFailure):
            ranks.barrier()
    return failure.status


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def merge_round_robin(parts: list, count: int):
    """parts[r]: the ScoreResult of examples r, r + world, ... of a chunk (None for an empty shard) -> one
    ScoreResult of the `count` examples in chunk order. Seconds: the slowest rank's (ranks run at once)."""
    import torch

    from .grm import ScoreResult

    world = len(parts)
    present = [p for p in parts if p is not None]
    merged = ScoreResult.concat(present)
    offsets, offset = [], 0
    for part in parts:
        offsets.append(offset)
        offset += len(part.examples) if part is not None else 0
    order = [offsets[i % world] + i // world for i in range(count)]  # chunk position -> row of `merged`
    index = torch.tensor(order)
    return replace(merged, examples=[merged.examples[i] for i in order], seconds=max(p.seconds for p in present),
                   scores=merged.scores[index], status=merged.status[index], perm=merged.perm[index],
                   n_responses=merged.n_responses[index], meta=None if merged.meta is None else merged.meta[index],
                   token_ids=None)


def strip_devices(argv: list[str]) -> list[str]:
    """argv without --devices X / --devices=X (what each worker is started with)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--devices":
            skip = True
        elif not token.startswith("--devices="):
            out.append(token)
    return out


def launch(argv: list[str], devices: list[str]) -> int:
    """Run `python -m grm_engine ARGV` once per device under torchrun's launcher (one host, a free port) -> the
    exit status: 0, or the lowest failing rank's status (130 when stopped by Ctrl-C)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    worker_argv = list(argv) + ["--device", "cpu" if devices[0] == "cpu" else "cuda"]
    if devices[0] != "cpu":
        indices = [d.split(":")[1] for d in devices]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # --devices counts within what the caller already made visible (parse_devices checked it)
            listed = [v.strip() for v in visible.split(",")]
            indices = [listed[int(i)] for i in indices]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(indices)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    args = torchrun.parse_args(["--standalone", "--nproc-per-node", str(len(devices)), "--max-restarts", "0",
                                "-m", "grm_engine", *worker_argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = [failure.exitcode for _, failure in sorted(e.failures.items()) if failure.exitcode > 0]
        return codes[0] if codes else 1
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0
