"""`--offload disk`: decoder blocks read lazily from the safetensors shards, one at a time.

The model is built as a skeleton: every tensor outside the decoder blocks
(embeddings, final norm, head, rotary buffers) is loaded, the blocks' parameters
stay on the meta device. `DiskBlocks` (a `BlockSource`) reads block i's tensors
from the shards when the pipeline asks for it and, on release, drops the weights
of the Linears that were quantized (their codes live in the method's results);
the block's small tensors (norms, skipped Linears) stay for the checkpoint writer.
Peak memory is then one block, the activations and the codes so far, whatever
the depth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.errors import CheckpointError, QuantkitError
from quantkit.formats.safetensors_io import header, open_file
from quantkit.models.arch import ArchSpec, get_arch, get_blocks
from quantkit.models.moe import PerExpertMoE, block_from_hub, swap_experts

log = logging.getLogger(__name__)


def shard_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, for every .safetensors file of a model folder."""
    from quantkit.formats.loader import weight_files

    index: dict[str, Path] = {}
    for f in weight_files(folder):
        for k in header(f):
            index[k] = f
    return index


def read_tensors(index: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    """Read `names` from their shards, opening each shard once (and closing it: no mapping stays)."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    out: dict[str, Tensor] = {}
    for f, keys in sorted(by_file.items()):
        with open_file(f) as fh:
            for k in keys:
                out[k] = fh.get_tensor(k)
    return out


def _drop_to_meta(module: nn.Module) -> None:
    """Replace the module's own parameters by meta tensors of the same shape (frees their memory)."""
    for name, p in list(module._parameters.items()):
        if p is not None:
            module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def build_skeleton(folder: Path, trust_remote_code: bool = False) -> tuple[nn.Module, ArchSpec, dict[str, Path]]:
    """The model with everything but its decoder blocks loaded (float32); blocks on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    spec = get_arch(model)
    swap_experts(model, spec)  # MoE: per-expert Linears (meta); blocks then read the hub's per-expert tensors
    index = shard_index(folder)
    prefix = spec.blocks + "."
    outside = [k for k in index if not k.startswith(prefix)]
    model.load_state_dict({k: t.float() if t.is_floating_point() else t
                           for k, t in read_tensors(index, outside).items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the shards: {', '.join(missing[:5])}")
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    return model.eval(), spec, index


class DiskBlocks:
    """A `BlockSource` that reads each block from the shards when its turn comes."""

    def __init__(self, model: nn.Module, spec: ArchSpec, index: dict[str, Path], drop: set[str]):
        self.blocks = get_blocks(model, spec)
        self.spec, self.index = spec, index
        self.drop = drop  # full names of the Linears whose weights are not needed after their block
        self._streamed: set[int] = set()  # blocks loaded by `streaming` hooks, freed after their call

    def __len__(self) -> int:
        return len(self.blocks)

    def _materialize(self, i: int, device: torch.device | str) -> nn.Module:
        block = self.blocks[i]
        prefix = f"{self.spec.blocks}.{i}."
        names = [k for k in self.index if k.startswith(prefix)]
        tensors = {k[len(prefix):]: t.float() if t.is_floating_point() else t
                   for k, t in read_tensors(self.index, names).items()}
        if self.spec.moe is not None and any(isinstance(m, PerExpertMoE) for m in block.modules()):
            tensors = block_from_hub(self.spec.moe, tensors)  # hub per-expert (or fused) names -> module names
        block.load_state_dict(tensors, strict=False, assign=True)
        still = [n for n, p in block.named_parameters() if p.is_meta]
        if still:
            raise CheckpointError(f"block {i}: tensors missing from the shards: {', '.join(still[:5])}")
        return block.to(device)

    def load(self, i: int, device: torch.device) -> nn.Module:
        block = self.blocks[i]
        self._streamed.discard(i)  # the pipeline owns it now: streaming hooks must not free it
        if any(p.is_meta for p in block.parameters()):
            return self._materialize(i, device)
        return block.to(device)

    def release(self, i: int, block: nn.Module) -> None:
        prefix = f"{self.spec.blocks}.{i}."
        block.to("cpu")
        for name, mod in block.named_modules():
            if prefix + name in self.drop:
                _drop_to_meta(mod)

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """While open, a full-model forward loads each block just for its call (then frees it).

        The pipeline needs this once for architectures whose blocks get different kwargs
        (one forward records them all) before it walks the blocks itself.
        """
        loaded = self._streamed

        def pre(i: int):
            def hook(_mod, args, kwargs):
                if any(p.is_meta for p in self.blocks[i].parameters()):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    self._materialize(i, hidden.device)
                    loaded.add(i)
            return hook

        def post(i: int):
            def hook(_mod, _args, _out):
                if i in loaded:
                    loaded.discard(i)
                    for mod in self.blocks[i].modules():
                        _drop_to_meta(mod)
            return hook

        with HookSet() as hs:
            for i, b in enumerate(self.blocks):
                hs.pre(b, pre(i), with_kwargs=True)
                hs.forward(b, post(i))
            yield


def offload_skeleton(source: Any, trust_remote_code: bool = False) -> tuple[nn.Module, Any, ArchSpec, dict[str, Path]]:
    """(skeleton model, tokenizer, spec, shard index) of a local model folder (`source`: a ModelSource)."""
    from quantkit.models.sources import _load_tokenizer

    if source.kind != "folder":
        raise QuantkitError(f"--offload disk reads safetensors shards from a local model folder; {source.name} "
                            f"is a {source.kind} source: convert it to a folder first or drop --offload")
    folder = Path(source.path)
    tok = _load_tokenizer(str(folder), trust_remote_code)
    model, spec, index = build_skeleton(folder, trust_remote_code)
    return model, tok, spec, index


def disk_blocks(model: nn.Module, spec: ArchSpec, index: dict[str, Path], quantized: set[str],
                keep_nothing: bool = False) -> DiskBlocks:
    """The `DiskBlocks` of a skeleton. `quantized`: full names of the Linears whose weights go after their
    block; `keep_nothing`: every weight of a finished block goes (its tensors are in the work folder)."""
    drop = set(quantized)
    if keep_nothing:
        drop |= {f"{spec.blocks}.{i}.{n}" for i, b in enumerate(get_blocks(model, spec)) for n, _ in b.named_modules()}
    source = DiskBlocks(model, spec, index, drop=drop)
    log.info("offload disk: %d blocks read one at a time from %d shard(s)", len(source), len(set(index.values())))
    return source
