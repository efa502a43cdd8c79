"""Cost of the work folder's checksums and of the durable writes (fsync) in a GPTQ run on smollm2-135m.

Not a test. One in-process `quantkit.api.quantize` run in which every xxh3-128 update and every os.fsync
is timed by a wrapper, so each cost is measured in the same run as the total it is compared with; then
the cost of a resume's verification (reading back and checking every block file and the inputs file the
run would continue from), measured on the kept work folder of a second, interrupted run.

    .venv/bin/python benchmarks/reliability.py --nsamples 64 --seqlen 512 --out benchmarks/results/reliability.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timed:
    """Wall seconds spent inside the wrapped calls."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


def instrument() -> tuple[Timed, Timed]:
    import xxhash

    hashing, syncing = Timed(), Timed()
    real_fsync, real_xxh = os.fsync, xxhash.xxh3_128

    def fsync(fd: int) -> None:
        t0 = time.perf_counter()
        real_fsync(fd)
        syncing.seconds += time.perf_counter() - t0
        syncing.calls += 1

    class XXH:
        def __init__(self, data: bytes = b"") -> None:
            self.h = real_xxh()
            if data:
                self.update(data)

        def update(self, data) -> None:
            t0 = time.perf_counter()
            self.h.update(data)
            hashing.seconds += time.perf_counter() - t0
            hashing.calls += 1
            hashing.bytes += memoryview(data).nbytes

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    os.fsync = fsync
    xxhash.xxh3_128 = XXH
    return hashing, syncing


def probe(mib: int = 75, repeats: int = 8) -> str:
    """The disk's and the hash's own cost for one inputs-sized file (smollm2, 64 x 512 tokens: 75 MiB),
    without a run around them: median fsync and xxh3-128 seconds of `repeats` fresh files."""
    import xxhash

    data = os.urandom(mib << 20)
    syncs, hashes = [], []
    folder = Path(tempfile.mkdtemp(prefix="qk-probe-"))
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            xxhash.xxh3_128(data).hexdigest()
            hashes.append(time.perf_counter() - t0)
            with open(folder / f"f{i}", "wb") as fh:
                fh.write(data)
                fh.flush()
                t0 = time.perf_counter()
                os.fsync(fh.fileno())
                syncs.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return (f"| one {mib} MiB file (an inputs file of this run), median of {repeats} | fsync {med(syncs):.3f} s "
            f"| xxh3-128 {med(hashes):.4f} s | load average {os.getloadavg()[0]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reliability.md")
    ap.add_argument("--probe-only", action="store_true", help="only the per-file fsync and hash probe")
    a = ap.parse_args()
    if a.probe_only:
        print(probe())
        return

    import torch

    from quantkit.api import quantize
    from quantkit.calib.workdir import work_path
    from quantkit.formats import safetensors_io as st

    hashing, syncing = instrument()
    calib = {"nsamples": a.nsamples, "seqlen": a.seqlen}
    tmp = Path(tempfile.mkdtemp(prefix="qk-reliab-"))
    try:
        t0 = time.perf_counter()
        s = quantize(a.model, "gptq", tmp / "q", scheme="w4g64", calib=calib, device="cpu")
        total = time.perf_counter() - t0
        h_run, f_run, f_calls, h_bytes = hashing.seconds, syncing.seconds, syncing.calls, hashing.bytes

        # a resume's verification: interrupt a second run after 6 blocks and time `verify` on its work folder
        def stop(stage: str, done: int, n: int) -> None:
            if stage == "blocks" and done == 6:
                raise KeyboardInterrupt
        try:
            quantize(a.model, "gptq", tmp / "r", scheme="w4g64", calib=calib, device="cpu", progress=stop)
        except KeyboardInterrupt:
            pass
        work = work_path(tmp / "r")
        files = sorted(work.glob("*.safetensors"))
        t1 = time.perf_counter()
        for f in files:
            st.checksum(f)
        verify = time.perf_counter() - t1
        verify_bytes = sum(f.stat().st_size for f in files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    rows = [
        ("checksums written with the work folder's files (xxh3-128)", h_run, f"{h_bytes / 2**30:.2f} GiB hashed"),
        ("fsync: work folder files, state.json, output files and folders", f_run, f"{f_calls} fsync calls"),
        (f"a resume's verification of {len(files)} files (block 0-5, inputs-6)", verify,
         f"{verify_bytes / 2**20:.0f} MiB read back"),
    ]
    lines = [
        f"# Reliability costs: checksums and durable writes, GPTQ w4g64 on {a.model}",
        "",
        f"Command: `.venv/bin/python benchmarks/reliability.py --nsamples {a.nsamples} --seqlen {a.seqlen}` "
        f"(CPU, {torch.get_num_threads()} threads, load average {load:.1f} at the end; the disk is the machine's "
        f"overlay filesystem). Every xxh3 update and os.fsync of the run is timed by a wrapper, so each cost "
        f"is a share of the same run's total ({total:.1f} s, quantize {s['quantize_seconds']:.1f} s).",
        "",
        "| what | seconds | share of the run | detail |",
        "|---|---:|---:|---|",
    ]
    for name, sec, detail in rows:
        lines.append(f"| {name} | {sec:.3f} | {100 * sec / total:.2f}% | {detail} |")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
