"""Benchmark harness: device ceilings, timing, peak memory, CUDA-graph replay, FLOP/byte counts, tables, JSON + PNG.

Every benchmark in this folder measures its rows beside the ceilings of the same device in the same process, prints a
markdown table (the anchor beside us) and saves JSON + PNG (device and date in the title) under benchmarks/results/
and, when the environment variable OUT is set (the GPU machine), under $OUT too. Benchmarks never assert: a failing
row becomes a note. On a CPU the same code runs with time.perf_counter (tiny shapes, to check the scripts).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

try:  # triton.testing.do_bench is the reference timer; events are the fallback
    import triton
    import triton.testing

    HAS_TRITON = True
except Exception:  # noqa: BLE001  (any import failure just means: use the fallback)
    triton = None
    HAS_TRITON = False

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

Fn = Callable[[], object]


# ------------------------------------------------------------------------------------------------- device, budget
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Deadline:
    """Wall-clock budget of a whole benchmark run: rows after it are skipped (with a note), never half-measured."""

    def __init__(self, seconds: float | None):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)

    def expired(self) -> bool:
        return self.left() <= 0


class RowRunner:
    """What every benchmark's row runner shares: the time budget, the rows measured so far, and how a failure
    becomes a row's note (never an exception). A CUDA error breaks the context: later rows are skipped."""

    def __init__(self, args, device, ceil: "Ceilings"):
        self.args, self.device, self.ceil = args, device, ceil
        self.deadline = Deadline(args.budget_s)
        self.rows: list[dict] = []
        self.cuda_broken: str | None = None
        self.timing = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)

    def skip_reason(self) -> str | None:
        if self.cuda_broken:
            return "skipped: CUDA context broken earlier"
        if self.deadline.expired():
            return "skipped: time budget"
        return None

    def failure(self, exc: BaseException, refusable: bool) -> str:
        text = short_error(exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            free_memory(self.device)
            return "OOM: " + text
        if "CUDA error" in text or "illegal memory access" in text or "device-side assert" in text:
            self.cuda_broken = text
            return "error: " + text
        return ("refused: " if refusable else "error: ") + text


def short_error(exc: BaseException, limit: int = 220) -> str:
    """One line: exception type and the first line(s) of its message."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def environment(device) -> dict:
    """Versions and device facts recorded with every result."""
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", None),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": _git_commit(),
    }
    if is_cuda(device):
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
                   torch_threads=torch.get_num_threads())
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001  (no git on the machine, or no .git in the copied tree)
        return None


# ------------------------------------------------------------------------------------------------------- timing
def _rotating(fns: Fn | Sequence[Fn]) -> tuple[Fn, int]:
    """One callable that cycles through several input sets (each call the next), so a working set that fits in L2
    is not timed warm; do_bench also flushes L2 between calls."""
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    if len(fns) == 1:
        return fns[0], 1
    i = [0]

    def call():
        f = fns[i[0] % len(fns)]
        i[0] += 1
        return f()

    return call, len(fns)


def bench(fns: Fn | Sequence[Fn], *, device="cuda", warmup_ms: float = 25.0, rep_ms: float = 100.0,
          grad_to_none: Sequence[torch.Tensor] | None = None, method: str = "auto") -> float:
    """Median time of one call in ms. ``fns``: a callable, or one callable per input set (used in turn).

    CUDA: triton.testing.do_bench (L2 flushed before every timed call) unless ``method="events"`` or Triton is
    missing, then CUDA events with the same protocol. CPU: time.perf_counter.
    """
    call, _ = _rotating(fns)
    if not is_cuda(device):
        return _bench_cpu(call, warmup_ms, rep_ms, grad_to_none)
    if method in ("auto", "triton") and HAS_TRITON:
        with torch.cuda.device(device):
            return float(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                 return_mode="median"))
    return _bench_events(call, device, warmup_ms, rep_ms, grad_to_none)


_L2_FLUSH: dict = {}


def _flush_l2(device) -> None:
    buf = _L2_FLUSH.get(str(device))
    if buf is None:
        buf = _L2_FLUSH[str(device)] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def _bench_events(call: Fn, device, warmup_ms, rep_ms, grad_to_none) -> float:
    call()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        _flush_l2(device)
        call()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    for _ in range(n_warmup):
        call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        for x in grad_to_none or ():
            x.grad = None
        _flush_l2(device)
        s.record()
        call()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _bench_cpu(call: Fn, warmup_ms, rep_ms, grad_to_none) -> float:
    t = time.perf_counter()
    call()
    estimate = max((time.perf_counter() - t) * 1e3, 1e-3)
    for _ in range(max(1, min(int(warmup_ms / estimate), 3))):
        call()
    times = []
    for _ in range(max(3, min(int(rep_ms / estimate), 50))):
        for x in grad_to_none or ():
            x.grad = None
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def first_call_s(fn: Fn, device) -> float:
    """Seconds of the first call (JIT compilation and autotuning included), synchronised."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def capture_graph(fns: Fn | Sequence[Fn], device, warmup_iters: int = 3) -> "torch.cuda.CUDAGraph":
    """Capture one call of each fn (in order) into a CUDA graph, after warm-up on a side stream (PyTorch's recipe)."""
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            for f in fns:
                f()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    torch.cuda.synchronize(device)
    return graph


def bench_graph(fns: Fn | Sequence[Fn], *, device="cuda", warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median ms of one call when replayed from a CUDA graph. With several fns (one per input set) the graph holds
    one call of each, so a replay walks through all input sets; the result is per call."""
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    graph = capture_graph(fns, device)
    try:
        return bench(graph.replay, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms) / len(fns)
    finally:
        del graph


def peak_memory_mib(fn: Fn, device, grad_to_none: Sequence[torch.Tensor] | None = None) -> float | None:
    """Peak memory allocated during one call, above what was allocated before it (the inputs), in MiB."""
    if not is_cuda(device):
        return None
    for x in grad_to_none or ():
        x.grad = None
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for x in grad_to_none or ():
        x.grad = None
    return peak / 2**20


# ---------------------------------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    """What this device can do, measured in this process: the denominators of every "% of" column."""
    copy_gbps: float | None = None  # device-to-device copy, bytes read + written per second / 1e9
    gemm_tflops: float | None = None  # dense GEMM on random data, 2 n^3 / s / 1e12
    copy_bytes: int = 0
    gemm_n: int = 0
    gemm_dtype: str = ""
    notes: list[str] = field(default_factory=list)


def measure_ceilings(device="cuda", *, copy_gib: float = 2.0, gemm_n: int = 8192, dtype=torch.bfloat16,
                     warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Ceilings:
    """Copy bandwidth (a ``copy_gib`` GiB buffer copied to another, counting read + write) and GEMM throughput
    (``gemm_n``^3 in ``dtype`` on random data)."""
    c = Ceilings(gemm_n=gemm_n, gemm_dtype=str(dtype).replace("torch.", ""))
    timing = dict(device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    try:
        c.copy_bytes, ms = _time_copy(int(copy_gib * 2**30), timing)
        c.copy_gbps = c.copy_bytes / (ms * 1e-3) / 1e9
    except Exception as exc:  # noqa: BLE001
        c.notes.append(f"copy ceiling: {short_error(exc)}")
    free_memory(device)
    try:
        c.gemm_tflops = 2 * gemm_n**3 / (_time_gemm(gemm_n, dtype, timing) * 1e-3) / 1e12
    except Exception as exc:  # noqa: BLE001
        c.notes.append(f"GEMM ceiling: {short_error(exc)}")
    free_memory(device)
    return c


def _time_copy(nbytes_: int, timing: dict) -> tuple[int, float]:
    """(bytes moved = read + written, ms) of one device-to-device copy of an ``nbytes_`` buffer."""
    src = torch.empty(nbytes_ // 4, dtype=torch.float32, device=timing["device"]).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes(src), bench(lambda: dst.copy_(src), **timing)


def _time_gemm(n: int, dtype, timing: dict) -> float:
    a, b = (torch.randn(n, n, dtype=dtype, device=timing["device"]) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=timing["device"])
    return bench(lambda: torch.matmul(a, b, out=out), **timing)


# ------------------------------------------------------------------------------------------ FLOP / byte counting
def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def attention_flops(B: int, T: int, H: int, D: int, *, causal: bool = True, mode: str = "fwd") -> float:
    """Softmax attention, FlashAttention's convention: forward = 2 GEMMs (Q K^T, P V) of 2 T^2 D each per head,
    halved when causal; backward = 2.5x forward (5 GEMMs)."""
    fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def throughput(ms: float | None, flops: float | None, bytes_: float | None, ceil: Ceilings) -> dict:
    """TFLOP/s, GB/s and their shares of the measured ceilings for one timed row."""
    out = {"tflops": None, "pct_gemm": None, "gbps": None, "pct_copy": None}
    if not ms or ms <= 0:
        return out
    if flops:
        out["tflops"] = flops / (ms * 1e-3) / 1e12
        if ceil.gemm_tflops:
            out["pct_gemm"] = 100.0 * out["tflops"] / ceil.gemm_tflops
    if bytes_:
        out["gbps"] = bytes_ / (ms * 1e-3) / 1e9
        if ceil.copy_gbps:
            out["pct_copy"] = 100.0 * out["gbps"] / ceil.copy_gbps
    return out


# ---------------------------------------------------------------------------------------------- tables, output
def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return format(value, spec) if spec else str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec) triples; missing values print as an em dash."""
    rows = list(rows)
    head = [h for _, h, _ in columns]
    body = [[_fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "device"


def output_dirs(results_dir: Path | str | None = None) -> list[Path]:
    """Where results go: ``results_dir`` (default benchmarks/results) and $OUT when set."""
    dirs = [Path(results_dir) if results_dir else RESULTS_DIR]
    if os.environ.get("OUT"):
        dirs.append(Path(os.environ["OUT"]))
    return dirs


def save_results(name: str, payload: dict, plot: Callable[[Path], str | None] | None,
                 results_dir: Path | str | None = None) -> list[str]:
    """Write ``<name>_<device>_<date>.json`` (+ .png from ``plot(path)``) into the results folder, and plain
    ``<name>.json`` / ``<name>.png`` into $OUT. Returns the paths written and any notes."""
    env = payload.get("env", {})
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{name}_{slug(env.get('device', 'device'))}_{stamp}"
    written = []
    dirs = output_dirs(results_dir)
    first = dirs[0]
    first.mkdir(parents=True, exist_ok=True)
    json_path = first / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default))
    written.append(str(json_path))
    png_path = first / f"{stem}.png"
    if plot is not None:
        try:
            note = plot(png_path)
        except Exception as exc:  # noqa: BLE001
            note = f"plot failed: {short_error(exc)}"
        if note:
            written.append(note)
    for extra in dirs[1:]:
        extra.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(json_path, extra / f"{name}.json")
        written.append(str(extra / f"{name}.json"))
        if png_path.exists():
            shutil.copyfile(png_path, extra / f"{name}.png")
            written.append(str(extra / f"{name}.png"))
    if png_path.exists():
        written.insert(1, str(png_path))
    return written


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return repr(obj)


def plot_title(what: str, env: dict) -> str:
    return f"{what} — {env.get('device', '?')} — {env.get('date', '')[:10]} (torch {env.get('torch')})"


def plot_bar_panels(path: Path, title: str, panels: Sequence[dict]) -> str | None:
    """Grouped bar charts, one panel each: ``{"title", "groups": [x labels], "series": {label: [value|None]},
    "ylabel", "log": bool}``. Returns a note instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"no PNG: matplotlib unavailable ({short_error(exc, 80)})"
    panels = [p for p in panels if p["groups"] and any(v is not None for s in p["series"].values() for v in s)]
    if not panels:
        return "no PNG: nothing measured"
    labels = list(dict.fromkeys(label for p in panels for label in p["series"]))  # one colour per label
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        groups, series = panel["groups"], panel["series"]
        n = max(1, len(series))
        width = 0.8 / n
        top = 0.0
        for j, (label, values) in enumerate(series.items()):
            pts = [(i + (j - (n - 1) / 2) * width, v) for i, v in enumerate(values) if v is not None and v > 0]
            bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=label,
                          color=f"C{labels.index(label) % 10}")
            for bar, (_, v) in zip(bars, pts):
                top = max(top, v)
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        if panel.get("log"):
            ax.set_yscale("log")
            ax.set_ylim(top=top * 4)
        else:
            ax.set_ylim(0, top * 1.2)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def print_block(text: str = "") -> None:
    print(text, flush=True)
    sys.stdout.flush()


if __name__ == "__main__":  # python benchmarks/harness.py: this device's ceilings and versions
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    small = dev == "cpu"
    c = measure_ceilings(dev, copy_gib=0.0625 if small else 2.0, gemm_n=512 if small else 8192)
    print(environment(dev))
    print(f"copy {c.copy_gbps or 0:.0f} GB/s (read+write, {c.copy_bytes / 2**30:.2f} GiB moved); "
          f"GEMM {c.gemm_tflops or 0:.2f} TFLOP/s ({c.gemm_dtype} {c.gemm_n}^3) {' '.join(c.notes)}")


# ------------------------------------------------------------------------------------------- shared CLI plumbing
def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (timeout) ends the run like Ctrl-C: report and save what was measured


def raise_(message: str):
    raise RuntimeError(message)


def add_common_args(p, smoke_help: str = "tiny shapes on CPU (checks the script; no fla)", fla_root=None) -> None:
    """The options every benchmark takes: --quick, --cpu-smoke, --budget-s, --results-dir (and --fla-root)."""
    p.add_argument("--quick", action="store_true", help="fewer repetitions (warmup 10 ms, rep 40 ms)")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    p.add_argument("--budget-s", type=float, default=None, help="skip the remaining rows after this many seconds")
    p.add_argument("--results-dir", default=None, help="default benchmarks/results (a temp dir with --cpu-smoke)")
    if fla_root is not None:
        p.add_argument("--fla-root", default=str(fla_root), help="folder holding fla/ (default .fla)")


def finish_common_args(args) -> None:
    """Repetition times from --quick / --cpu-smoke; a --cpu-smoke run writes its results to a temp dir."""
    args.warmup_ms, args.rep_ms = (10.0, 40.0) if args.quick else (25.0, 100.0)
    if args.cpu_smoke:
        args.warmup_ms, args.rep_ms = 5.0, 20.0
        if args.results_dir is None:
            args.results_dir = tempfile.mkdtemp(prefix="linflow-bench-smoke-")


def pick_device(args) -> tuple[torch.device, torch.dtype] | None:
    """CPU for --cpu-smoke, else the current CUDA device (bf16); None (with a message) when there is none."""
    if args.cpu_smoke:
        return torch.device("cpu"), torch.bfloat16
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    print("no CUDA device: use --cpu-smoke to check the script on CPU", flush=True)
    return None


def parse_shapes(text: str | None, default: dict, named: dict) -> dict:
    """--shapes: a comma list of names from `named` or BxT / B8-T4096 items; `default` when empty."""
    if not text:
        return dict(default)
    shapes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item in named:
            shapes[item] = named[item]
            continue
        m = re.fullmatch(r"[Bb]?(\d+)\s*[x\-]\s*[Tt]?(\d+)", item)
        if not m:
            raise SystemExit(f"--shapes: cannot read {item!r} (use e.g. 8x4096 or B8-T4096)")
        B, T = int(m.group(1)), int(m.group(2))
        shapes[f"B{B}-T{T}"] = (B, T)
    return shapes
