"""The fixed costs of a calibrated run (#25): a method that tokenizes its calibration text first hands that tokenizer
on to the model's loading (Gemma 3's took ~4 CPU s to read a second time), and the checkpoint is what it was."""

import torch

from quantkit import api
from quantkit.methods import base
from quantkit.models import sources


def test_a_calibrated_run_reads_the_tokenizer_once(tiny_llama, text_file, tmp_path, monkeypatch):
    reads = []
    real = sources._load_tokenizer

    def counting(path, trust_remote_code):
        reads.append(path)
        return real(path, trust_remote_code)

    monkeypatch.setattr(sources, "_load_tokenizer", counting)
    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "seed": 0}
    api.quantize(str(tiny_llama), "smoothquant-rtn", tmp_path / "a", scheme="w8a8", calib=calib, device="cpu")
    assert len(reads) == 1
    # the same run with a tokenizer read twice (as before) writes the same bytes
    monkeypatch.setattr(base, "load_model", _reading_again(base.load_model))
    api.quantize(str(tiny_llama), "smoothquant-rtn", tmp_path / "b", scheme="w8a8", calib=calib, device="cpu")
    assert len(reads) == 3
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def _reading_again(load_model):
    def load(src, dtype=torch.float32, trust_remote_code=False, tokenizer=None):
        return load_model(src, dtype, trust_remote_code, None)
    return load
