"""The work folder `OUT.partial/` damaged before a resume: a flipped byte, a truncation or a deletion of each
kind of file. Every row ends in exit 0 with the uninterrupted run's exact bytes, or in one line naming the
file and --no-resume with exit 2; never in success with other bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from quantkit.calib.workdir import work_path
from tests.faults.conftest import copy_partial, hashes, invoke, leftovers, quantize_args


def flip(f: Path) -> None:
    """One byte flipped in the middle of the file (in the tensor data for a safetensors file)."""
    data = bytearray(f.read_bytes())
    data[len(data) // 2 + 3] ^= 0x40
    f.write_bytes(bytes(data))


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def delete(f: Path) -> None:
    f.unlink()


def flip_header(f: Path) -> None:
    """A byte of a safetensors header's JSON overwritten (the header no longer parses)."""
    data = bytearray(f.read_bytes())
    data[12] = ord("}")
    f.write_bytes(bytes(data))


@dataclass(frozen=True)
class Damage:
    method: str
    file: str
    how: str
    code: int          # 0: resumed, byte-identical; 2: refused with one line
    phrase: str        # what the one line must say (exit 2); "" for exit 0


DAMAGE = {"flip": flip, "truncate": truncate, "delete": delete, "header": flip_header}
B = "block-{:05d}.safetensors".format
S = "side-{:05d}.safetensors".format
INPUTS = "inputs-00003.safetensors"
CASES = [
    # block 0's inputs come from the calibration text: it is recomputed, and every block after it
    Damage("gptq", B(0), "flip", 0, ""),
    Damage("gptq", B(0), "truncate", 0, ""),
    Damage("gptq", B(0), "delete", 0, ""),
    Damage("gptq", B(0), "header", 0, ""),
    # a later block's inputs were not kept: one line, the file, --no-resume
    Damage("gptq", B(1), "flip", 2, "block-00001.safetensors does not match its checksum"),
    Damage("gptq", B(1), "truncate", 2, "block-00001.safetensors has"),
    Damage("gptq", B(1), "delete", 2, "block-00001.safetensors is missing"),
    Damage("gptq", B(2), "flip", 2, "block-00002.safetensors does not match its checksum"),
    Damage("gptq", B(2), "truncate", 2, "block-00002.safetensors has"),
    Damage("gptq", B(2), "header", 2, "block-00002.safetensors does not match its checksum"),
    Damage("gptq", INPUTS, "flip", 2, "inputs-00003.safetensors does not match its checksum"),
    Damage("gptq", INPUTS, "truncate", 2, "inputs-00003.safetensors has"),
    Damage("gptq", INPUTS, "delete", 2, "inputs-00003.safetensors is missing"),
    Damage("gptq", "state.json", "flip", 2, "state.json"),
    Damage("gptq", "state.json", "truncate", 2, "state.json"),
    Damage("gptq", "fingerprint.json", "flip", 2, "--no-resume"),
    Damage("gptq", "fingerprint.json", "truncate", 2, "fingerprint.json"),
    Damage("gptq", "fingerprint.json", "delete", 2, "fingerprint.json"),
    Damage("gptq", "state.json", "delete", 0, ""),        # no state: no block is trusted, all recomputed
    # AWQ keeps side results (scales, clips) per block
    Damage("awq", B(0), "flip", 0, ""),
    Damage("awq", S(0), "flip", 0, ""),
    Damage("awq", S(0), "truncate", 0, ""),
    Damage("awq", S(1), "flip", 2, "side-00001.safetensors does not match its checksum"),
    Damage("awq", S(1), "truncate", 2, "side-00001.safetensors has"),
    Damage("awq", S(1), "delete", 2, "side-00001.safetensors is missing"),
    Damage("awq", B(2), "flip", 2, "block-00002.safetensors does not match its checksum"),
    Damage("awq", INPUTS, "flip", 2, "inputs-00003.safetensors does not match its checksum"),
    Damage("awq", "state.json", "flip", 2, "state.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.method}-{c.file}-{c.how}" for c in CASES])
def test_damaged_work_folder(case, tiny, reference, partial, tmp_path):
    model, text = tiny
    out = tmp_path / "q"
    work = copy_partial(partial[case.method], out)
    DAMAGE[case.how](work / case.file)
    r = invoke(quantize_args(model, text, out, case.method))
    assert r.exit_code == case.code, r.output
    if case.code == 0:
        assert hashes(out) == hashes(reference[case.method])  # the same bytes as the uninterrupted run
        assert not work.exists()
    else:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and case.phrase in lines[0] and "--no-resume" in lines[0], lines
        assert "internal error" not in r.output
        assert not out.exists()  # nothing written where the checkpoint goes; the work folder is the user's call
    assert leftovers(tmp_path) == []


def test_a_refused_folder_starts_over_with_no_resume(tiny, reference, partial, tmp_path):
    model, text = tiny
    out = tmp_path / "q"
    flip(copy_partial(partial["gptq"], out) / B(1))
    assert invoke(quantize_args(model, text, out)).exit_code == 2
    r = invoke(quantize_args(model, text, out, "gptq", "--no-resume"))
    assert r.exit_code == 0, r.output
    assert hashes(out) == hashes(reference["gptq"]) and not work_path(out).exists()


def test_an_intact_folder_resumes_where_it_stopped(tiny, reference, partial, tmp_path):
    model, text = tiny
    out = tmp_path / "q"
    copy_partial(partial["awq"], out)
    (work_path(out) / ".block-00003.safetensors.tmp").write_bytes(b"half a write")  # killed before its rename
    r = invoke(quantize_args(model, text, out, "awq", "--json", str(tmp_path / "s.json")))
    assert r.exit_code == 0, r.output
    assert '"resumed_at_block": 3' in (tmp_path / "s.json").read_text()
    assert hashes(out) == hashes(reference["awq"]) and leftovers(tmp_path) == []
