"""Peak memory and run time of the chapters next to mybinder.org's 2 GiB limit.

Each notebook runs top to bottom in a fresh kernel (nbclient) with ``SA_KIT_PROFILE=cpu`` (the
classroom default) and, unless ``--cache`` is given, an empty temporary ``SA_KIT_CACHE``, so
the measurement includes training the models (the worst case on a fresh Binder). While it runs,
a thread samples the resident memory (RSS) of the kernel process and all its children; at the
end the kernel also reports its own high-water mark (``ru_maxrss``), which catches peaks
shorter than the sampling interval. The larger of the two is the figure.

    python benchmarks/binder_memory.py                  # notebooks 01 and 02, cpu profile
    python benchmarks/binder_memory.py --profile ci     # quick check of the script itself

Exit status 1 if a notebook fails or goes over the limit. Timings are printed too, but are only
meaningful on an otherwise idle machine; memory does not depend on that.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("notebooks/01_vae_mnist.ipynb", "notebooks/02_class_conditional_ddpm.ipynb",
             "notebooks/03_text_to_image.ipynb", "notebooks/04_is_it_forgotten.ipynb")
BINDER_LIMIT = 2 * 1024 ** 3
MIB = 1024 ** 2
PEAK_CELL = "import resource; print('RU_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF)" \
            ".ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except OSError:
            pass
        todo += children.get(p, [])
    return total


class PeakSampler(threading.Thread):
    """Samples :func:`tree_rss` every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def measure(path: Path, timeout: int, interval: float, executed: Path | None = None) -> dict:
    """Run one notebook in a fresh kernel; returns peak memory, wall time and any error.

    ``executed``: also write the executed notebook there, each code cell's seconds in its
    metadata (``python -m sa_kit.book times --executed`` prints them per section)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    result: dict = {"notebook": path.name, "error": None}
    t0 = time.perf_counter()
    with client.setup_kernel():
        pid = client.km.provisioner.process.pid
        sampler = PeakSampler(pid, interval)
        sampler.start()
        try:
            for index, cell in enumerate(nb.cells):
                start = time.perf_counter()
                client.execute_cell(cell, index)
                if cell.cell_type == "code":
                    cell.metadata["sa_kit_seconds"] = round(time.perf_counter() - start, 2)
        except Exception as e:                      # a failing cell: report it, keep the peak
            result["error"] = f"{type(e).__name__}: {str(e)[-800:]}"
        finally:
            result["sampled_peak"] = sampler.stop()
    result["seconds"] = time.perf_counter() - t0
    kib = [o.get("text", "") for o in nb.cells[-1].get("outputs", [])
           if "RU_MAXRSS_KIB" in o.get("text", "")]
    if kib:
        self_kib, children_kib = map(int, kib[0].split()[1:3])
        result["kernel_maxrss"] = self_kib * 1024
        result["children_maxrss"] = children_kib * 1024
    result["peak"] = max(result["sampled_peak"], result.get("kernel_maxrss", 0))
    if executed is not None:
        nb.cells.pop()                                  # the peak-reading cell
        nb.metadata["sa_kit"] = {"profile": os.environ.get("SA_KIT_PROFILE", "?"),
                                 "executed_by": "benchmarks/binder_memory.py"}
        executed.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed / path.name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=("ci", "cpu", "gpu"))
    parser.add_argument("--notebooks", nargs="*", default=list(NOTEBOOKS))
    parser.add_argument("--cache", help="SA_KIT_CACHE to use (default: a fresh empty one "
                                        "per notebook)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--interval", type=float, default=0.05, help="sampling interval, s")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--executed", type=Path, help="also write the executed notebooks here, "
                        "with each cell's seconds (python -m sa_kit.book times --executed DIR)")
    args = parser.parse_args(argv)

    os.environ["SA_KIT_PROFILE"] = args.profile       # the kernels inherit the environment
    os.environ.setdefault("SA_KIT_OFFLINE", "1")
    print(f"profile {args.profile}, SA_KIT_OFFLINE={os.environ['SA_KIT_OFFLINE']}, "
          f"Binder limit {BINDER_LIMIT / MIB:.0f} MiB, sampling every {args.interval} s")
    results, failed = [], False
    for name in args.notebooks:
        path = (ROOT / name).resolve()
        if not path.exists():
            print(f"{name}: not found (not written yet?), skipped")
            results.append({"notebook": Path(name).name, "error": "not found"})
            failed = True
            continue
        with tempfile.TemporaryDirectory(prefix="sa_kit_binder_") as tmp:
            os.environ["SA_KIT_CACHE"] = args.cache or tmp
            print(f"{path.name}: running in a fresh kernel ...", flush=True)
            r = measure(path, args.timeout, args.interval, args.executed)
        results.append(r)
        over = r["peak"] > BINDER_LIMIT
        failed |= over or r["error"] is not None
        print(f"{r['notebook']}: peak RSS {r['peak'] / MIB:7.0f} MiB "
              f"(sampled tree {r['sampled_peak'] / MIB:.0f} MiB, kernel ru_maxrss "
              f"{r.get('kernel_maxrss', 0) / MIB:.0f} MiB) = {r['peak'] / BINDER_LIMIT:.0%} of "
              f"the 2 GiB limit {'OVER' if over else 'ok'}; {r['seconds']:.0f} s"
              + (f"\n  ERROR {r['error']}" if r["error"] else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
