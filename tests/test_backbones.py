"""The per-layer interface with no prompts reproduces the libraries' own outputs (open_clip encode_image /
encode_text, HF ViltModel pooler_output), on the tiny configs and once on a real-size random-init architecture;
local weights load through the functions users call; offline absence gives a clear error."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
from common import load_clip, load_vilt
from data import Collate, load_split

TOL = 1e-5


def toy_batch(bb, n=6, max_text_len=40):
    ds = load_split("toy", None, "train", missing_type="both", rate=0.5, seed=0)
    return Collate(bb, max_text_len)([ds[i] for i in range(n)])


def test_tiny_clip_matches_open_clip():
    bb = load_clip("tiny-clip", "")
    batch = toy_batch(bb)
    img, txt = bb.encode(batch)
    with torch.no_grad():
        ref_img = bb.model.encode_image(batch["image"])
        ref_txt = bb.model.encode_text(batch["text"])
    assert (img - ref_img).abs().max() <= TOL
    assert (txt - ref_txt).abs().max() <= TOL
    assert bb.info["quick_gelu"] is True


def test_clip_prompts_shift_pool_and_mask():
    """Prepended text prompts: the EOT position follows them and the causal mask covers them, so appending
    prompts that are then stripped at pooling changes the output (text attends to prompts), but zero-length
    prompts do not."""
    bb = load_clip("tiny-clip", "")
    batch = toy_batch(bb, 3)
    t = bb.text_embed(batch["text"])
    p = torch.randn(3, 5, bb.width_text)
    x = torch.cat([p, t], 1)
    for i in range(bb.num_layers):
        x = bb.text_block(i, x)
    prompted = bb.text_pool(x, batch["text"], n_prompt=5)
    assert prompted.shape == (3, bb.embed_dim)
    assert not torch.allclose(prompted, bb.model.encode_text(batch["text"]), atol=1e-4)
    # The prompt tokens themselves never see the text: they sit before it under the causal mask.
    y = torch.cat([p, t.flip(0)], 1)
    for i in range(bb.num_layers):
        y = bb.text_block(i, y)
    assert torch.allclose(x[:, :5], y[:, :5], atol=1e-6)


def test_tiny_vilt_matches_hf():
    bb = load_vilt("tiny-vilt")
    batch = toy_batch(bb)
    torch.manual_seed(0)
    hidden, mask = bb.encode(batch)
    ours = bb.vilt.pooler(hidden)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = bb.vilt(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                      pixel_values=batch["image"], pixel_mask=batch["pixel_mask"]).pooler_output
    assert (ours - ref).abs().max() <= TOL


def test_real_size_random_init_matches_libraries():
    """ViT-B-16 CLIP and ViLT-B/32 architectures (random init: equality does not depend on the weights)."""
    import open_clip
    from transformers import ViltConfig, ViltModel
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, force_quick_gelu=True)
    bb = common.FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16"), preprocess, {"backbone": "clip"})
    batch = toy_batch(bb, 2)
    img, txt = bb.encode(batch)
    assert (img - model.encode_image(batch["image"])).abs().max() <= TOL
    assert (txt - model.encode_text(batch["text"])).abs().max() <= TOL
    vilt = common.FrozenViLT(ViltModel(ViltConfig()), common.tiny_vilt_tokenizer(), {"backbone": "vilt"})
    vilt.shorter, vilt.longer = 96, 160                             # small images keep the test fast
    batch = toy_batch(vilt, 2)
    batch["input_ids"] = batch["input_ids"] % 30522
    torch.manual_seed(0)
    ours = vilt.vilt.pooler(vilt.encode(batch)[0])
    torch.manual_seed(0)
    with torch.no_grad():
        ref = vilt.vilt(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                        pixel_values=batch["image"], pixel_mask=batch["pixel_mask"]).pooler_output
    assert (ours - ref).abs().max() <= TOL


def test_local_weights_roundtrip(tmp_path):
    """Save tiny weights, load them back through the very functions the CLI calls."""
    bb = load_clip("tiny-clip", "")
    path = tmp_path / "tiny_clip.bin"
    torch.save(bb.model.state_dict(), path)
    again = load_clip("tiny-clip", str(path))
    for (k, a), b in zip(bb.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert again.info["pretrained"] == str(path) and again.info["quick_gelu"] is True
    vilt = load_vilt("tiny-vilt")
    vilt.vilt.save_pretrained(tmp_path / "vilt")
    vilt.tokenizer.save_pretrained(tmp_path / "vilt")
    again = load_vilt(str(tmp_path / "vilt"))
    for (k, a), b in zip(vilt.vilt.state_dict().items(), again.vilt.state_dict().values()):
        assert torch.equal(a, b), k
    assert again.tokenizer("apple river")["input_ids"] == vilt.tokenizer("apple river")["input_ids"]


def test_quick_gelu_follows_the_weights(monkeypatch):
    """--clip-quick-gelu auto asks open_clip for QuickGELU exactly when open_clip's table says the tag was trained with
    it (OpenAI's were; LAION's were not); on / off force it. The model is never built (no weights here)."""
    import open_clip
    asked = []

    def record(name, pretrained=None, force_quick_gelu=False):
        asked.append(force_quick_gelu)
        raise RuntimeError("weights not downloaded here")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", record)
    for tag, mode, expected in (("openai", "auto", True), ("laion400m_e31", "auto", False), ("openai", "off", False),
                                ("laion400m_e31", "on", True)):
        with pytest.raises(common.WeightsError):
            load_clip("ViT-B-16", tag, mode)
        assert asked[-1] is expected, (tag, mode)
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True


def test_vilt_text_is_truncated_at_max_text_len_and_padded_to_the_longest():
    """ViLT text: [CLS] + the first L - 2 WordPiece tokens + [SEP] when longer than max_text_len L, padded with
    [PAD] (mask 0) to the longest text of the batch; written out from the tokenizer's own pieces."""
    bb = load_vilt("tiny-vilt")
    tok, long_text, short = bb.tokenizer, "apple river plum lake pear ocean " * 3, "plum"
    item = {"id": "a", "image": Image.new("RGB", (32, 32)), "label": 0, "missing": 0}
    batch = Collate(bb, 9)([dict(item, text=long_text), dict(item, id="b", text=short)])
    pieces = tok.convert_tokens_to_ids(tok.tokenize(long_text))
    assert batch["input_ids"][0].tolist() == [tok.cls_token_id] + pieces[:7] + [tok.sep_token_id]
    short_ids = [tok.cls_token_id] + tok.convert_tokens_to_ids(tok.tokenize(short)) + [tok.sep_token_id]
    assert batch["input_ids"][1].tolist() == short_ids + [tok.pad_token_id] * (9 - len(short_ids))
    assert batch["text_mask"].tolist() == [[1] * 9, [1] * len(short_ids) + [0] * (9 - len(short_ids))]


def test_offline_weights_error_names_the_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.WeightsError, match="ViltModel.from_pretrained"):
        load_vilt("someone/not-cached-vilt")
    with pytest.raises(common.WeightsError, match="create_model_and_transforms"):
        load_clip("ViT-B-16", "laion400m_e31")


def test_vilt_text_positions_extended_by_interpolation():
    bb = load_vilt("tiny-vilt")
    old = bb.vilt.embeddings.text_embeddings.position_embeddings.weight.clone()
    common.extend_text_positions(bb, 128)
    new = bb.vilt.embeddings.text_embeddings.position_embeddings.weight
    assert new.shape == (128, old.shape[1]) and not new.requires_grad
    assert torch.allclose(new[0], old[0]) and torch.allclose(new[-1], old[-1])


def test_dummy_inputs_and_vilt_resize():
    bb = load_vilt("tiny-vilt")
    item = {"id": "x", "image": Image.new("RGB", (100, 60)), "text": "apple", "label": 0, "missing": 2}
    batch = Collate(bb, 40)([item, dict(item, missing=1, image=Image.new("RGB", (60, 100)))])
    # shorter side 32 -> (53, 32) for 100x60, floored to multiples of the patch 8 -> (48, 32)
    assert batch["image"].shape == (2, 3, 48, 48)
    assert torch.all(batch["image"][0, :, :32, :48] == 1) and batch["pixel_mask"][0].sum() == 32 * 48
    assert batch["input_ids"][1].tolist()[:2] == [bb.tokenizer.cls_token_id, bb.tokenizer.sep_token_id]


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-vilt"])
def test_image_cache_gives_the_same_pixels(tmp_path, food101_root, name):
    """--cache-images: pre-decoded uint8 images normalised in the loader equal on-the-fly preprocessing, and a
    second opening reuses the cache files."""
    bb = load_clip("tiny-clip", "") if name == "tiny-clip" else load_vilt("tiny-vilt")
    ds = load_split("food101", food101_root, "val", missing_type="none", rate=0, seed=0)
    cached = data.CachedImages(ds, bb, str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and len(cached) == len(ds) and cached.labels().tolist() == ds.labels().tolist()
    collate = Collate(bb, 40)
    a, b = collate([ds[i] for i in range(len(ds))]), collate([cached[i] for i in range(len(ds))])
    assert torch.allclose(a["image"], b["image"], atol=1e-6) and a["ids"] == b["ids"]
    mtime = os.path.getmtime(tmp_path / files[0])
    data.CachedImages(ds, bb, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == files and os.path.getmtime(tmp_path / files[0]) == mtime


def test_pool_skips_prepended_prompts():
    """Pooling with n_prompt prompt tokens in front equals pooling the same sequence without them: [CLS] of the image
    tower and EOT of the text tower move by n_prompt (the blocks are not run: this pins the offsets alone)."""
    bb = load_clip("tiny-clip", "")
    batch = toy_batch(bb, 3)
    x, t = bb.image_embed(batch["image"]), bb.text_embed(batch["text"])
    px, pt = torch.randn(3, 5, bb.width_image), torch.randn(3, 5, bb.width_text)
    with torch.no_grad():
        assert torch.allclose(bb.image_pool(torch.cat([px, x], 1), 5), bb.image_pool(x), atol=1e-6)
        assert torch.allclose(bb.text_pool(torch.cat([pt, t], 1), batch["text"], 5), bb.text_pool(t, batch["text"]),
                              atol=1e-6)



def test_modality_tokens_are_the_prompt_free_layer_inputs():
    """common.modality_tokens (AOEPT's bank, NM2I's truth): per modality, the mean over its real tokens of the input of
    layers 0..N-1, against the libraries' own passes: open_clip's embeddings and resblocks (text: SOT..EOT), and HF
    ViltModel's hidden_states (its embedding output and each layer's output), text and image slices masked."""
    bb = load_clip("tiny-clip", "")
    batch = toy_batch(bb)
    clip, ids = bb.model, batch["text"]
    with torch.no_grad():
        got = common.modality_tokens(bb, batch, 3)
        x, t = clip.visual._embeds(batch["image"]), clip.token_embedding(ids) + clip.positional_embedding
        real = (torch.arange(77)[None] <= ids.argmax(-1, keepdim=True)).float()[..., None]
        for l in range(3):
            assert torch.allclose(got["image"][:, l], x.mean(1), atol=1e-5)
            assert torch.allclose(got["text"][:, l], (t * real).sum(1) / real.sum(1), atol=1e-5)
            x = clip.visual.transformer.resblocks[l](x)
            t = clip.transformer.resblocks[l](t, attn_mask=torch.full((77, 77), float("-inf")).triu(1))
    bb = load_vilt("tiny-vilt")
    rng = np.random.default_rng(0)
    items = [{"id": str(k), "image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "label": 0,
              "text": text, "missing": 0} for k, (h, w, text) in enumerate(
                  [(64, 64, "apple river"), (40, 90, "a very small photo of the lake"), (90, 40, "plum")])]
    batch = Collate(bb, 40)(items)                                  # images of three sizes: padded patches
    assert batch["pixel_mask"].float().mean() < 1
    with torch.no_grad():
        got = common.modality_tokens(bb, batch, 4)
        out = bb.vilt(input_ids=batch["input_ids"], attention_mask=batch["text_mask"], pixel_values=batch["image"],
                      pixel_mask=batch["pixel_mask"], output_hidden_states=True)
        _, mask = bb.embed(batch)
        L_t = batch["input_ids"].shape[1]
        for l in range(4):
            h = out.hidden_states[l]
            for name, part in (("text", slice(0, L_t)), ("image", slice(L_t, None))):
                w = mask[:, part].float()[..., None]
                assert torch.allclose(got[name][:, l], (h[:, part] * w).sum(1) / w.sum(1), atol=1e-4), (name, l)

# Semantic breaks of common.py's backbone pieces and dummy inputs these tests must catch.
MUTATIONS = [
    {"file": "data.py", "old": "max_length=self.max_text_len,", "new": "max_length=self.max_text_len - 1,", "why": "ViLT text truncated one token short of --max-text-len", "tests": ["tests/test_backbones.py::test_vilt_text_is_truncated_at_max_text_len_and_padded_to_the_longest"]},
    {"file": "common.py", "old": "quick = tag_cfg.get(\"quick_gelu\", False) if tag_cfg else bool(pretrained)", "new": "quick = False if tag_cfg else bool(pretrained)", "why": "the OpenAI tag runs with plain GELU, not the QuickGELU it was trained with", "tests": ["tests/test_backbones.py::test_quick_gelu_follows_the_weights"]},
    {"file": "common.py", "old": "            image.append(x.mean(1))", "new": "            image.append(x[:, 0])", "why": "CLIP image mean replaced by the [CLS] token", "tests": ["tests/test_backbones.py::test_modality_tokens_are_the_prompt_free_layer_inputs"]},
    {"file": "common.py", "old": "    return torch.arange(ids.shape[1], device=ids.device)[None] <= ids.argmax(-1, keepdim=True)", "new": "    return torch.arange(ids.shape[1], device=ids.device)[None] < ids.argmax(-1, keepdim=True)", "why": "CLIP text means drop the EOT token", "tests": ["tests/test_backbones.py::test_modality_tokens_are_the_prompt_free_layer_inputs"]},
    {"file": "common.py", "old": "            image.append(masked_mean(x[:, L_t:], mask[:, L_t:]))", "new": "            image.append(x[:, L_t:].mean(1))", "why": "ViLT image means include the padded patches", "tests": ["tests/test_backbones.py::test_modality_tokens_are_the_prompt_free_layer_inputs"]},
    {"file": "common.py", "old": ".triu(1)", "new": ".triu(2)", "why": "CLIP's causal mask lets a text token see the next one"},
    {"file": "common.py", "old": "ids.argmax(dim=-1)] @ self.model.text_projection",
     "new": "ids.argmax(dim=-1) - 1] @ self.model.text_projection", "why": "CLIP text pooled one token before EOT"},
    {"file": "common.py", "old": "x = self.model.ln_final(x[:, n_prompt:])", "new": "x = self.model.ln_final(x)",
     "why": "CLIP text pooling ignores the prepended prompts (EOT read at the wrong position)"},
    {"file": "common.py", "old": "pooled, _ = self.model.visual._pool(x[:, n_prompt:])",
     "new": "pooled, _ = self.model.visual._pool(x)", "why": "CLIP image pooling reads the first prompt token, not [CLS]"},
    {"file": "common.py", "old": "return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min",
     "new": "return 0.0 * mask[:, None, None, :].to(dtype)", "why": "ViLT attends to padded text tokens"},
    {"file": "data.py", "old": "return torch.ones_like(pixels) if item[\"missing\"] == IMAGE_MISSING else pixels",
     "new": "return torch.zeros_like(pixels) if item[\"missing\"] == IMAGE_MISSING else pixels",
     "why": "the missing-image dummy is zeros, not MAP's all-ones tensor"},
    {"file": "data.py", "old": "texts = [\"\" if it[\"missing\"] == TEXT_MISSING else it[\"text\"] for it in items]",
     "new": "texts = [it[\"text\"] for it in items]", "why": "a text-missing sample keeps its text"},
    {"file": "data.py", "old": "scale = bb.shorter / min(w, h)", "new": "scale = bb.shorter / max(w, h)",
     "why": "ViLT resize scales the longer side to S"},
    {"file": "data.py", "old": "return (x - torch.tensor(norm.mean)[:, None, None]) / torch.tensor(norm.std)[:, None, None]",
     "new": "return x - torch.tensor(norm.mean)[:, None, None]", "why": "cached CLIP images are not divided by the std"},
]
