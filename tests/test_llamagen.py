"""Official LlamaGen files: GPT c2i (all released sizes) and the VQ-16 tokenizer, loaded key for key.

No real weights are available offline, so the files here are built from the key lists derived from LlamaGen's
source (tests/data/backbone-keys.txt, a copy of the key lists printed from the released checkpoints) and saved in the released layouts:
`{"model": state_dict}` for DDP-trained models and the tokenizer, the bare state dict for FSDP-trained ones.
The GPT-B- and VQ-16-sized tests are marked slow (CI runs them): about 20 s together on one CPU thread.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from varkd.checkpoints import load_gpt, load_llamagen_gpt, load_llamagen_vq, load_vq
from varkd.cli import main
from varkd.config import ImportGPTJob, ImportTokenizerJob, OptimConfig, TermConfig, to_yaml
from varkd.decode import generate
from varkd.distill import teacher_logits, term_loss
from varkd.loop import autocast, make_optimizer
from varkd.models.gpt import GPT, GPT_models, gpt_config
from varkd.models.vq import VQConfig, VQModel, vq_config
from varkd.sampling import Sampling
from varkd.steps.llamagen import import_tokenizer

from tests.helpers import KEYS_FILE, parse_shapes, random_state, save, section, vq16_shapes

SIZES = ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"]


# --- the reference key lists ---------------------------------------------------------------------------------------
def gpt_sizes() -> dict[str, dict[str, int]]:
    """{"GPT-B": {"n_layer": 12, ..., "params": 110888448}, ...} from the config lines of the key file."""
    return {name: {k: int(v.replace(",", "")) for k, v in re.findall(r"(\w+)=([\d,]+)", rest)}
            for name, rest in (line.split(": ", 1) for line in section("LlamaGen GPT configs"))}


def official_gpt_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The key list of a c2i size: GPT-B's (layers.0 repeated) with 768 / 2048 / 2304 replaced by its dim / FFN
    hidden / 3 * dim, the rule docs/llamagen.md A.2 states for the other sizes."""
    lines = section("GPT-B c2i state_dict")
    assert lines[-1].strip() == "... layers.1..11 identical to layers.0; total tensors=88"
    b, s = gpt_sizes()["GPT-B"], gpt_sizes()[name]
    swap = {b["dim"]: s["dim"], b["ffn_hidden"]: s["ffn_hidden"], 3 * b["dim"]: 3 * s["dim"]}
    shapes = {}
    for key, shape in parse_shapes(lines).items():
        shape = tuple(swap.get(d, d) for d in shape)
        if key.startswith("layers.0."):
            shapes.update({key.replace("layers.0.", f"layers.{i}.", 1): shape for i in range(s["n_layer"])})
        else:
            shapes[key] = shape
    return shapes


def placeholder_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Zero-stride views of one zero: the right keys and shapes in a file of a few KB, for the error paths."""
    return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}


# --- sizes: every released config, without allocating it --------------------------------------------------------
def test_registry_is_the_released_c2i_sizes():
    assert set(GPT_models) == set(SIZES)
    assert vq_config("VQ-16") == VQConfig()


@pytest.mark.parametrize("block_size", [256, 576])
@pytest.mark.parametrize("name", SIZES)
def test_every_size_matches_the_official_layout(name, block_size):
    ref = gpt_sizes()[name]
    with torch.device("meta"):
        model = GPT(gpt_config(name, block_size=block_size))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.head_dim, cfg.ffn_hidden) == tuple(
        ref[k] for k in ("n_layer", "n_head", "dim", "head_dim", "ffn_hidden"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_gpt_shapes(name)
    assert model.num_params() == ref["params"]
    # the RoPE table is real (CPU) even on meta, and one row longer than the grid: the zero class row
    assert model.freqs_cis.shape == (1 + block_size, cfg.head_dim // 2, 2) and not model.freqs_cis.is_meta


@pytest.mark.parametrize("name, params", [("VQ-16", 71_883_403), ("VQ-8", 70_109_835)])
def test_vq_registry_matches_the_official_layout(name, params):
    header = next(line for line in KEYS_FILE.read_text().splitlines() if line.startswith(f"== LlamaGen {name}"))
    assert int(re.search(r"=([\d,]+)$", header).group(1).replace(",", "")) == params
    with torch.device("meta"):
        model = VQModel(vq_config(name))
    assert sum(p.numel() for p in model.parameters()) == params
    if name == "VQ-16":
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == vq16_shapes()


# --- loader errors (placeholder files: keys and shapes only) ----------------------------------------------------
def test_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"c2i_B_256\.pt does not exist.*FoundationVision/LlamaGen"
                                                r"/resolve/main/c2i_B_256\.pt"):
        load_llamagen_gpt(tmp_path / "c2i_B_256.pt", "GPT-B", 256)
    with pytest.raises(FileNotFoundError, match=r"x\.pt does not exist.*resolve/main/c2i_3B_384\.pt"):
        load_llamagen_gpt(tmp_path / "x.pt", "GPT-3B", 384)
    with pytest.raises(FileNotFoundError, match=r"GPT-XL 256px .* no official file"):
        load_llamagen_gpt(tmp_path / "x.pt", "GPT-XL", 256)
    with pytest.raises(FileNotFoundError, match=r"VQ-16 tokenizer .*resolve/main/vq_ds16_c2i\.pt"):
        load_llamagen_vq(tmp_path / "vq.pt")


def test_corrupt_and_foreign_files_name_the_file(tmp_path):
    bad = tmp_path / "c2i_B_256.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))} is corrupt"):
        load_llamagen_gpt(bad, "GPT-B", 256)
    foreign = save(tmp_path / "foreign.pt", {"tok_embeddings.weight": torch.zeros(2), "steps": 3})
    with pytest.raises(ValueError, match=r"foreign\.pt is not a LlamaGen state dict.*\['steps'\]"):
        load_llamagen_gpt(foreign, "GPT-B", 256)


def test_wrong_size_or_grid_for_an_official_name(tmp_path):
    with pytest.raises(ValueError, match=r"official GPT-B file for 384px images, not GPT-B at 256px"):
        load_llamagen_gpt(tmp_path / "c2i_B_384.pt", "GPT-B", 256)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_llamagen_gpt(tmp_path / "x.pt", "GPT-B", 250)
    with pytest.raises(KeyError, match="GPT-XXXL"):
        load_llamagen_gpt(tmp_path / "x.pt", "GPT-XXXL", 384)


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "bare"])
def test_every_mismatch_is_named(tmp_path, layout):
    state = placeholder_state(official_gpt_shapes("GPT-B"))
    state["layers.3.attn.wqkv.weight"] = state.pop("layers.3.attention.wqkv.weight")  # renamed
    del state["norm.weight"]  # missing
    state["tok_embeddings.weight"] = torch.zeros(()).expand(16383, 768)  # mis-shaped
    path = save(tmp_path / "gpt.pt", state, layout)
    with pytest.raises(ValueError) as err:
        load_llamagen_gpt(path, "GPT-B", 256)
    msg = str(err.value)
    assert msg.startswith(f"LlamaGen GPT-B 256px checkpoint {path} does not match the model")
    assert "missing keys ['layers.3.attention.wqkv.weight', 'norm.weight']" in msg
    assert "unexpected keys ['layers.3.attn.wqkv.weight']" in msg
    assert "tok_embeddings.weight: file (16383, 768) vs model (16384, 768)" in msg


def test_a_file_of_another_size_is_refused(tmp_path):
    path = save(tmp_path / "gpt.pt", placeholder_state(official_gpt_shapes("GPT-L")), "bare")
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.12\..*; mis-shaped \['cls_embedding"):
        load_llamagen_gpt(path, "GPT-B", 256)


def test_vq_mismatches_are_named(tmp_path):
    state = placeholder_state(vq16_shapes())
    del state["quantize.codebook_used"]  # LlamaGen's loader is strict about the usage buffer too
    state["decoder.conv_out.weights"] = state.pop("decoder.conv_out.weight")
    path = save(tmp_path / "vq.pt", state)
    with pytest.raises(ValueError, match=r"VQ-16 tokenizer .*vq\.pt does not match the model: missing keys "
                                         r"\['decoder\.conv_out\.weight', 'quantize\.codebook_used'\]; "
                                         r"unexpected keys \['decoder\.conv_out\.weights'\]"):
        load_llamagen_vq(path)


def test_stray_freqs_cis_is_ignored(tmp_path):
    state = placeholder_state(official_gpt_shapes("GPT-B"))
    state["freqs_cis"] = torch.zeros(577, 32, 2)  # some files carry a RoPE table; ours is recomputed
    model = load_llamagen_gpt(save(tmp_path / "gpt.pt", state), "GPT-B", 384)
    assert "freqs_cis" not in model.state_dict() and model.config.block_size == 576
    assert model.freqs_cis.shape == (577, 32, 2) and torch.count_nonzero(model.freqs_cis[0]) == 0
    assert not any(t.is_meta for t in model.state_dict().values())


def test_training_arguments_saved_beside_the_weights_load(tmp_path):
    """LlamaGen's training scripts save "args" (an argparse.Namespace) next to "model"; weights_only allows it."""
    import argparse

    path = tmp_path / "vq.pt"
    torch.save({"model": placeholder_state(vq16_shapes()), "args": argparse.Namespace(codebook_size=16384)},
               path)
    assert load_llamagen_vq(path).config.codebook_size == 16384


# --- GPT-B-sized files with real values --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_b_files(tmp_path_factory):
    """Two GPT-B-sized official-layout files: DDP style {"model": ...} and FSDP style (bare, with freqs_cis)."""
    folder = tmp_path_factory.mktemp("llamagen")
    shapes = official_gpt_shapes("GPT-B")
    ddp = random_state(shapes, seed=0)
    fsdp = {**random_state(shapes, seed=1), "freqs_cis": torch.zeros(257, 32, 2)}
    return {"ddp": (save(folder / "ddp.pt", ddp), ddp), "fsdp": (save(folder / "fsdp.pt", fsdp, "bare"), fsdp)}


@pytest.mark.slow
@pytest.mark.parametrize("kind, image_size", [("ddp", 256), ("fsdp", 384)])
def test_gpt_b_file_loads_strictly_and_runs(gpt_b_files, kind, image_size):
    path, state = gpt_b_files[kind]
    model = load_llamagen_gpt(path, "GPT-B", image_size)
    assert not model.training and model.config.block_size == (image_size // 16) ** 2
    loaded = model.state_dict()
    assert set(loaded) == set(state) - {"freqs_cis"}
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == torch.float32 for k in loaded)
    logits = model(torch.randint(0, 16384, (2, 31)), torch.tensor([207, 1000]))
    assert logits.shape == (2, 32, 16384) and torch.isfinite(logits).all()


def reference_logits(state: dict, cfg, idx: torch.Tensor, labels: torch.Tensor, class_rope: str = "zero"):
    """LlamaGen's c2i forward written out from docs/llamagen.md A.1, independently of varkd.models.gpt: the 2-D RoPE
    rotates interleaved pairs as complex numbers (Meta's Llama style) and attention is an explicit softmax.
    class_rope="zero" is LlamaGen's class row (q and k multiplied by 0); "identity" leaves them unrotated."""
    B, L, H, hd = idx.shape[0], idx.shape[1] + 1, cfg.n_head, cfg.head_dim
    g = math.isqrt(cfg.block_size)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2))  # head_dim / 4 frequencies
    row, col = (t.flatten().float() for t in torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))
    angles = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=1)  # [g*g, head_dim/2], raster order
    first = torch.zeros(1, hd // 2) if class_rope == "zero" else torch.ones(1, hd // 2)
    rot = torch.cat([torch.complex(first, torch.zeros_like(first)), torch.polar(torch.ones_like(angles), angles)])[:L]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x):  # [B, L, H, hd]
        z = torch.view_as_complex(x.reshape(B, L, H, hd // 2, 2).contiguous()) * rot[None, :, None]
        return torch.view_as_real(z).reshape(B, L, H, hd)

    x = torch.cat([state["cls_embedding.embedding_table.weight"][labels][:, None],
                   state["tok_embeddings.weight"][idx]], dim=1)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for i in range(cfg.n_layer):
        w = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        h = rms(x, w["attention_norm.weight"])
        q, k, v = (t.reshape(B, L, H, hd) for t in (h @ w["attention.wqkv.weight"].T).split(cfg.dim, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) / math.sqrt(hd)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, cfg.dim) @ w["attention.wo.weight"].T
        h = rms(x, w["ffn_norm.weight"])
        gated = F.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T)
        x = x + gated @ w["feed_forward.w2.weight"].T
    return rms(x, state["norm.weight"]) @ state["output.weight"].T


@pytest.mark.slow
def test_gpt_b_logits_match_a_direct_computation(gpt_b_files):
    """The loaded model reproduces LlamaGen's numerics, including the zero RoPE row of the class token, over two
    rows of the 16 x 16 grid (so both the row and the column angles are exercised)."""
    path, state = gpt_b_files["ddp"]
    model = load_llamagen_gpt(path, "GPT-B", 256)
    idx, labels = torch.randint(0, 16384, (2, 24)), torch.tensor([3, 1000])
    with torch.no_grad():
        logits = model(idx, labels)
        torch.testing.assert_close(logits, reference_logits(state, model.config, idx, labels), rtol=1e-4, atol=1e-4)
        # the quirk matters: with an unrotated (rather than zeroed) class token the logits are different
        unrotated = reference_logits(state, model.config, idx, labels, class_rope="identity")
        assert (logits - unrotated).abs().max() > 1e-2


@pytest.mark.slow
def test_gpt_b_kd_step(gpt_b_files):
    """One distillation step at GPT-B size as the trainer takes it: teacher logits under bf16 autocast without
    gradients, the student's forward KL under bf16 autocast, backward, clipping, AdamW."""
    teacher = load_llamagen_gpt(gpt_b_files["fsdp"][0], "GPT-B", 256).requires_grad_(False)
    student = load_llamagen_gpt(gpt_b_files["ddp"][0], "GPT-B", 256).train()
    optimizer = make_optimizer(student, OptimConfig(lr=1e-4))
    codes, labels = torch.randint(0, 16384, (2, 256)), torch.tensor([1, 999])
    target = teacher_logits(teacher, codes, labels)
    assert target.shape == (2, 256, 16384) and not target.requires_grad
    before = student.output.weight.detach().clone()
    with autocast(torch.device("cpu"), "bf16"):
        logits = student(codes[:, :-1], labels)
    loss = term_loss(TermConfig(divergence="fkl"), logits, codes, target, temperature=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(grad_norm) and grad_norm > 0
    assert all(p.grad is not None for p in student.parameters())
    assert not torch.equal(student.output.weight, before)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.slow
def test_gpt_b_samples_with_kv_cache_and_cfg(gpt_b_files):
    """Two images with CFG (a batch of 4) through the KV cache. GPT-B sized, but on a 4 x 4 grid (image_size 64):
    the weights do not depend on the grid, and 256 steps would take ~30 s on one CPU thread."""
    model = load_llamagen_gpt(gpt_b_files["ddp"][0], "GPT-B", 64)
    codes = generate(model, torch.tensor([207, 360]), Sampling(cfg_scale=4.0, top_k=2000),
                     generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16384
    assert not model.has_caches


@pytest.mark.slow
def test_import_gpt_writes_a_checkpoint_the_workflow_loads(gpt_b_files, tmp_path):
    """`varkd import-gpt`: the released file becomes teacher.pt / student.pt with the registry config the study
    resolves for the backbone, and the same weights."""
    path, state = gpt_b_files["fsdp"]
    job = tmp_path / "import.yaml"
    job.write_text(to_yaml(ImportGPTJob(size="GPT-B", image_size=384, path=str(path), out=str(tmp_path / "t.pt"))))
    assert main(["import-gpt", str(job)]) == 0
    model = load_gpt(tmp_path / "t.pt")
    assert model.config == gpt_config("GPT-B", block_size=576)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- VQ-16 --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vq16_file_decodes_and_encodes(tmp_path):
    state = random_state(vq16_shapes())
    model = load_llamagen_vq(save(tmp_path / "vq_ds16_c2i.pt", state))
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        image = model.decode_code(torch.randint(0, 16384, (1, 256)), shape=(1, 8, 16, 16))
        assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()
        _, _, (_, _, indices) = model.encode(image.clamp(-1, 1))
    assert indices.shape == (256,) and 0 <= indices.min() and indices.max() < 16384


@pytest.mark.slow
def test_import_tokenizer(tmp_path):
    state = random_state(vq16_shapes(), seed=2)
    job = ImportTokenizerJob(name="VQ-16", path=str(save(tmp_path / "vq_ds16_c2i.pt", state)),
                             out=str(tmp_path / "tokenizer.pt"))
    import_tokenizer(job, torch.device("cpu"))
    model = load_vq(job.out)
    assert model.config == vq_config("VQ-16") and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
