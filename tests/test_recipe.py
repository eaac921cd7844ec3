"""The frozen ViLT and the training recipe as the official code runs them (common.py, data.py): each piece against
its oracle — HF's own ViltLayer, a brute-force attention, the official formulas written out here from reading
the official code (YiLunLee/missing_aware_prompts 9aa5381, zhao-yh20/MemPrompt 342739e)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from common import load_vilt

TOL = 1e-5


def vilt_with_layers(config=None):
    from transformers import ViltConfig, ViltModel
    torch.manual_seed(0)
    model = ViltModel(config or ViltConfig(num_hidden_layers=1, vocab_size=100))
    return common.FrozenViLT(model, None, {"backbone": "vilt"})


def randomise_norms(bb):
    """Random-init LayerNorms are the identity (weight 1, bias 0); trained ones are not: give them random affines."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in bb.vilt.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return bb


def random_bias(B, L, seed=1):                                      # a key mask with padding in every row but the first
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, L, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return mask, common.FrozenViLT.attention_bias(mask, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Item 8: the block through scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_sdpa_block_equals_hf_vilt_layer(size):
    """bb.block (SDPA over the layer's own modules) equals HF's eager ViltLayer on the same input and mask, fp32."""
    bb = randomise_norms(load_vilt("tiny-vilt") if size == "tiny" else vilt_with_layers())
    torch.manual_seed(2)
    B, L = 3, 37
    x = torch.randn(B, L, bb.width)
    mask, bias = random_bias(B, L)
    with torch.no_grad():
        for i in range(bb.num_layers):
            ref = bb.vilt.encoder.layer[i](x, bias)[0]
            assert (bb.block(i, x, bias) - ref).abs().max() <= TOL
    assert not torch.equal(bb.block(0, x, bias), bb.block(0, x, random_bias(B, L, seed=3)[1]))   # the mask is used


def brute_force_prefix_attention(layer, x, bias, K_p, V_p):
    """softmax(Q [K_p; K]^T / sqrt(d) + [0; bias]) [V_p; V] per head, in explicit loops over batch and heads."""
    attn = layer.attention.attention
    H, d = attn.num_attention_heads, attn.attention_head_size
    h = layer.layernorm_before(x)
    q, k, v = attn.query(h), torch.cat([K_p, attn.key(h)], 1), torch.cat([V_p, attn.value(h)], 1)
    full_bias = torch.cat([torch.zeros(x.shape[0], K_p.shape[1]), bias[:, 0, 0]], 1)     # (B, P + L)
    out = torch.zeros_like(q)
    for b in range(x.shape[0]):
        for j in range(H):
            cols = slice(j * d, (j + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d) + full_bias[b]
            out[b, :, cols] = scores.softmax(-1) @ v[b, :, cols]
    x = x + layer.attention.output.dense(out)
    return x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))


@pytest.mark.parametrize("size", ["tiny", "real"])
def test_sdpa_block_kv_prefix_equals_brute_force(size):
    """kv_prefix: raw key/value rows prepended after the frozen projections, split per head, seen by every query."""
    bb = randomise_norms(load_vilt("tiny-vilt") if size == "tiny" else vilt_with_layers())
    torch.manual_seed(4)
    B, L, P = 2, 19, 5
    x, K_p, V_p = torch.randn(B, L, bb.width), torch.randn(B, P, bb.width), torch.randn(B, P, bb.width)
    _, bias = random_bias(B, L)
    with torch.no_grad():
        ours = bb.block(0, x, bias, kv_prefix=(K_p, V_p))
        ref = brute_force_prefix_attention(bb.vilt.encoder.layer[0], x, bias, K_p, V_p)
    assert ours.shape == x.shape and (ours - ref).abs().max() <= TOL
    assert (ours - bb.block(0, x, bias)).abs().max() > 1e-3                      # the prefix changes the output



def official_block(layer, x, bias, p=0.0):
    """MAP's timm Block written out (vision_transformer_prompts.py Block / Attention / Mlp, drop=p, attn_drop=0):
    x + proj_drop(proj(attn(norm1(x)))), then x + drop(fc2(drop(act(fc1(norm2(x)))))), LayerNorm eps 1e-6."""
    attn, D = layer.attention.attention, x.shape[-1]
    B, L, H, d = x.shape[0], x.shape[1], attn.num_attention_heads, attn.attention_head_size
    norm1, norm2 = layer.layernorm_before, layer.layernorm_after
    h = F.layer_norm(x, (D,), norm1.weight, norm1.bias, eps=1e-6)
    q, k, v = (f(h).view(B, L, H, d).transpose(1, 2) for f in (attn.query, attn.key, attn.value))
    o = ((q @ k.transpose(-2, -1)) * d ** -0.5 + bias).softmax(-1) @ v
    x = x + F.dropout(layer.attention.output.dense(o.transpose(1, 2).reshape(B, L, D)), p)
    h = F.layer_norm(x, (D,), norm2.weight, norm2.bias, eps=1e-6)
    h = F.dropout(F.gelu(layer.intermediate.dense(h)), p)
    return x + F.dropout(layer.output.dense(h), p)


def near_constant_rows(B, L, D, seed=6):
    """Rows of variance ~1e-8: MAP's constant-row prompt initialisation after one small update, where eps matters."""
    return 0.5 + 1e-4 * torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Item 1: LayerNorm eps 1e-6 in the ViT part, 1e-12 in the BERT text embeddings
# ---------------------------------------------------------------------------------------------------------
def test_vit_layer_norms_use_eps_1e6_text_embedding_norm_keeps_1e12():
    bb = randomise_norms(load_vilt("tiny-vilt"))
    B, L, D = 2, 9, bb.width
    x, (_, bias) = near_constant_rows(B, L, D), random_bias(B, L)
    with torch.no_grad():
        for i in range(bb.num_layers):
            assert (bb.block(i, x, bias) - official_block(bb.vilt.encoder.layer[i], x, bias)).abs().max() <= TOL
        final = bb.vilt.layernorm
        assert (bb.final_norm(x) - F.layer_norm(x, (D,), final.weight, final.bias, eps=1e-6)).abs().max() <= TOL
        text_norm = bb.vilt.embeddings.text_embeddings.LayerNorm
        ref = F.layer_norm(x, (D,), text_norm.weight, text_norm.bias, eps=1e-12)
        assert (text_norm(x) - ref).abs().max() <= TOL
    assert bb.vilt.embeddings.text_embeddings.LayerNorm.eps == 1e-12


# ---------------------------------------------------------------------------------------------------------
# Item 2: dropout inside the frozen ViLT while the method trains, where MAP's ViT and BERT embeddings have it
# ---------------------------------------------------------------------------------------------------------
class Method(torch.nn.Module):
    """The smallest method: a trainable vector added to the pooled feature, around a frozen backbone."""

    def __init__(self, bb):
        super().__init__()
        self.bb, self.w = bb, torch.nn.Parameter(torch.zeros(bb.width))

    def forward(self, batch):
        hidden, _ = self.bb.encode(batch)
        return hidden[:, 0] + self.w


def toy_vilt_batch(bb, n=6):
    from data import Collate, load_split
    ds = load_split("toy", None, "train", missing_type="none", rate=0, seed=0)
    return Collate(bb, 40)([ds[i] for i in range(n)])


def test_backbone_dropout_blocks_match_the_official_block_with_the_same_masks():
    bb = randomise_norms(load_vilt("tiny-vilt"))
    bb.set_dropout(0.1)
    method = Method(bb).train()
    assert bb.dropout_active and not bb.training and not any(m.training for m in bb.vilt.encoder.modules())
    B, L = 3, 21
    x, (_, bias) = torch.randn(B, L, bb.width), random_bias(B, L)
    with torch.no_grad():
        for i in range(bb.num_layers):
            torch.manual_seed(7)
            ours = bb.block(i, x, bias)
            torch.manual_seed(7)
            assert (ours - official_block(bb.vilt.encoder.layer[i], x, bias, p=0.1)).abs().max() <= TOL
    method.eval()
    assert not bb.dropout_active
    with torch.no_grad():
        assert (bb.block(0, x, bias) - official_block(bb.vilt.encoder.layer[0], x, bias)).abs().max() <= TOL


def test_backbone_dropout_after_both_embeddings_only_in_training():
    """Text: BERT embedding dropout after its LayerNorm; image: pos_drop after the position embedding; both before the
    modality-type embedding. So (embedding - type embedding) has a fraction p of exact zeros in each modality."""
    bb = load_vilt("tiny-vilt")
    bb.set_dropout(0.1)
    method, batch = Method(bb), toy_vilt_batch(bb, 16)
    types = bb.vilt.embeddings.token_type_embeddings.weight
    L_t = batch["input_ids"].shape[1]
    with torch.no_grad():
        method.train()
        x, mask = bb.embed(batch)
        method.eval()
        y, _ = bb.embed(batch)
    type_rows = torch.cat([types[0].expand(L_t, -1), types[1].expand(y.shape[1] - L_t, -1)])
    real = mask[..., None].bool().expand_as(x)                      # HF draws the image padding anew each call
    zeros = (x - type_rows) == 0
    for part in (slice(0, L_t), slice(L_t + 1, None)):             # text; patches (the random-init image [CLS] is 0)
        rate = zeros[:, part][real[:, part]].float().mean()
        assert 0.07 < rate < 0.13, rate
    kept = real[:, :L_t] & ~zeros[:, :L_t]                           # text survivors are scaled by 1 / (1 - p)
    assert torch.allclose((x - type_rows)[:, :L_t][kept], (y - type_rows)[:, :L_t][kept] / 0.9, atol=1e-5)
    with torch.no_grad():
        torch.manual_seed(0)                                        # HF's patch selection draws from the global RNG
        ref = bb.vilt(input_ids=batch["input_ids"], attention_mask=batch["text_mask"], pixel_values=batch["image"],
                      pixel_mask=batch["pixel_mask"]).last_hidden_state
        torch.manual_seed(0)
        assert (bb.encode(batch)[0] - ref).abs().max() <= TOL                  # evaluation: no dropout at all


def test_backbone_dropout_gets_no_gradient_into_the_frozen_weights():
    bb = load_vilt("tiny-vilt")
    bb.set_dropout(0.1)
    method, batch = Method(bb).train(), toy_vilt_batch(bb, 4)
    method(batch).pow(2).sum().backward()
    assert method.w.grad is not None and method.w.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    torch.manual_seed(0)
    a = method(batch)
    torch.manual_seed(1)
    assert not torch.allclose(a, method(batch))                                # training: the masks differ per draw


def test_backbone_dropout_flag_defaults():
    import aoept, map, memprompt, muap, promise, syp
    for module, p in ((map, 0.1), (memprompt, 0.1), (muap, 0.1), (syp, 0.0), (aoept, 0.0), (promise, 0.0)):
        assert module.parser().parse_args([]).backbone_dropout == p, module.__name__


# ---------------------------------------------------------------------------------------------------------
# Item 3: the text position table stretched by the official formula
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len", [77, 128, 512, 1024])
def test_text_positions_follow_the_official_interpolation(max_len):
    bb = load_vilt("tiny-vilt")
    old = bb.vilt.embeddings.text_embeddings.position_embeddings.weight.detach().clone()       # (40, D)
    D = old.shape[1]
    common.extend_text_positions(bb, max_len)
    new = bb.vilt.embeddings.text_embeddings.position_embeddings.weight
    # MAP vilt_missing_aware_prompt_module.py (and MemPrompt, AOEPT): interpolate the (1, 1, 40, D) view, bilinear
    official = F.interpolate(old.view(1, 1, 40, D), size=(max_len, D), mode="bilinear").squeeze()
    assert new.shape == (max_len, D) and torch.equal(new, official) and not new.requires_grad
    # the same by hand: half-pixel centres, linear between the two nearest rows, clamped at the ends
    src = ((torch.arange(max_len, dtype=torch.float64) + 0.5) * 40 / max_len - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=39)
    w = (src - lo)[:, None]
    hand = old.double()[lo] * (1 - w) + old.double()[(lo + 1).clamp(max=39)] * w
    assert (new.double() - hand).abs().max() <= 1e-6
    assert bb.vilt.embeddings.text_embeddings.position_ids.shape == (1, max_len)



# ---------------------------------------------------------------------------------------------------------
# Item 4: weight-decay groups as the official set_schedule
# ---------------------------------------------------------------------------------------------------------
class Named(torch.nn.Module):
    """Parameter names of the kinds the methods have: a prompt, an nn.Sequential head with a LayerNorm inside, a LayerNorm
    called `norm`, norm1/norm2 (nn.TransformerEncoderLayer), and a frozen backbone."""

    def __init__(self):
        super().__init__()
        self.bb = torch.nn.Linear(3, 3).requires_grad_(False)
        self.prompt = torch.nn.Parameter(torch.ones(2, 4))
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.norm = torch.nn.LayerNorm(4)
        self.block = torch.nn.TransformerEncoderLayer(4, 1, 8, batch_first=True)


def official_groups(model):
    """vilt_utils.py set_schedule's rule, written out: decayed unless the name contains one of no_decay."""
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias", "norm1.weight",
                "norm2.bias", "norm2.weight"]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, p in named if any(nd in n for nd in no_decay)}
    return {n for n, p in named} - exempt, exempt


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_weight_decay_groups_follow_the_official_no_decay_names(optimizer):
    import argparse
    model = Named()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    args = argparse.Namespace(optimizer=optimizer, lr=0.1, weight_decay=0.5, decay_exempt="bias-norm")
    opt = common.make_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]
    decay, exempt = official_groups(model)
    assert got == [(decay, 0.5), (exempt, 0.0)]
    assert "head.1.weight" in decay and "norm.weight" in exempt and "block.norm1.weight" in exempt
    assert not any(n.startswith("bb.") for group, _ in got for n in group)   # the frozen backbone is in neither
    # one step with zero gradients: only the decay moves a parameter (AdamW: p <- p (1 - lr wd); Adam: the L2 term)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.all(p == 1)}
    assert moved == decay
    args.decay_exempt = "none"
    assert [len(g["params"]) for g in common.make_optimizer(Named(), args).param_groups] == [len(decay) + len(exempt)]


def test_decay_exempt_defaults():
    import aoept, map, memprompt
    assert map.parser().parse_args([]).decay_exempt == memprompt.parser().parse_args([]).decay_exempt == "bias-norm"
    assert aoept.parser().parse_args([]).decay_exempt == "none"            # AOEPT's get_optimizer decays everything



# ---------------------------------------------------------------------------------------------------------
# Item 5: validation every --val-interval of an epoch, the best check kept, resume exact at a mid-epoch check
# ---------------------------------------------------------------------------------------------------------
def lightning_checks(steps, interval):
    """PL 1.1's rule (val_check_batch = int(batches * val_check_interval); validate when (i + 1) % it == 0)."""
    every = int(steps * interval)
    return [s for s in range(1, steps + 1) if every and s % every == 0]


@pytest.mark.parametrize("steps,interval", [(100, 0.2), (101, 0.2), (33, 0.11), (7, 0.2), (4, 1.0), (9, 0.5)])
def test_check_steps_are_lightnings_val_check_interval_plus_the_epoch_end(steps, interval):
    assert common.check_steps(steps, interval) == sorted(set(lightning_checks(steps, interval) or [1]) | {steps})


def test_val_interval_defaults_and_bad_values():
    import map, memprompt, muap, syp
    from common import finalize_args
    for module in (map, memprompt, muap):
        for dataset, value in (("food101", 0.2), ("mmimdb", 0.2), ("hatememes", 0.11), ("toy", 1.0)):
            assert finalize_args(module.parser().parse_args(["--dataset", dataset])).val_interval == value
    assert finalize_args(syp.parser().parse_args(["--dataset", "food101"])).val_interval == 1.0
    with pytest.raises(SystemExit, match="--val-interval 0.0"):
        common.cli(map.parser(), map.main, ["--val-interval", "0"])


CHECKED = ["--backbone", "tiny-clip", "--prompt-length", "2", "--batch-size", "128", "--micro-batch", "128",
           "--epochs", "1", "--val-interval", "0.5", "--seed", "1"]


def test_fit_keeps_the_best_mid_epoch_check(tmp_path, monkeypatch):
    """4 steps, a check every 2: the scripted validation metric peaks at the first check (step 2), so the
    checkpoint is the state after step 2, and history holds one epoch with both checks."""
    import map
    from safetensors.torch import load_file
    real, scripted, states = common.evaluate, [0.9, 0.1], []

    def evaluate(run, model, dataset, scores=None):
        if len(states) < len(scripted) and dataset is run.val_set:
            states.append(common.method_state(model))
            return {"accuracy": scripted[len(states) - 1]}
        return real(run, model, dataset, scores)
    monkeypatch.setattr(common, "evaluate", evaluate)
    res = common.cli(map.parser(), map.main, CHECKED + ["--out", str(tmp_path)])
    assert [c["step"] for c in res["history"][0]["checks"]] == [2, 4] and len(res["history"]) == 1
    saved = load_file(tmp_path / "checkpoint.safetensors")
    assert all(torch.equal(saved[k], states[0][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[1][k]) for k in states[0])       # training went on after it


class Interrupted(Exception):
    pass


def test_resume_at_a_mid_epoch_check_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """ViLT with backbone dropout (the random stream must continue too): killed right after the first check's
    last.safetensors (step 2 of 4), resumed, it ends with the uninterrupted run's metrics, predictions and history."""
    import map
    argv = ["--backbone", "tiny-vilt", "--prompt-length", "2", "--batch-size", "128", "--micro-batch", "128", "--epochs",
            "1", "--val-interval", "0.5", "--backbone-dropout", "0.1", "--seed", "2"]
    whole = common.cli(map.parser(), map.main, argv + ["--out", str(tmp_path / "whole")])
    original = common.save_last

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted
    monkeypatch.setattr(common, "save_last", save_then_stop)
    with pytest.raises(Interrupted):
        common.cli(map.parser(), map.main, argv + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(common, "save_last", original)
    resumed = common.cli(map.parser(), map.main, argv + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed["metrics"] == whole["metrics"]
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in resumed["history"]] == strip
    assert (tmp_path / "cut" / "predictions_test.csv").read_text() == (tmp_path / "whole" / "predictions_test.csv").read_text()



# ---------------------------------------------------------------------------------------------------------
# The optimiser step: accumulation, clipping, the schedule's shapes, the global batches, the task scores
# ---------------------------------------------------------------------------------------------------------
def one_sgd_step(tmp_path, micro, clip=0.0):
    """One optimiser step of train_one_epoch on map.py / tiny-clip (no dropout: deterministic) with SGD lr 1 and a
    constant schedule, so the update is minus the (clipped) gradient -> (update per tensor, the step's mean loss)."""
    import map
    argv = ["--backbone", "tiny-clip", "--batch-size", "30", "--micro-batch", str(micro), "--prompt-length", "2",
            "--prompt-depth", "2", "--val-interval", str(1 / 17), "--clip-grad", str(clip), "--out", str(tmp_path)]
    run = common.setup(common.finalize_args(map.parser().parse_args(argv)))
    torch.manual_seed(0)
    model = map.MAP(run.bb, run.num_outputs, "input", 2, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    def loss_fn(out, batch):
        return common.task_loss(out["logits"], batch["label"], run.task)
    step, loss, _, samples = next(common.train_one_epoch(run, model, loss_fn, opt, schedule, params, 0))
    assert (step, samples) == (1, 30)
    return [b - p.detach() for b, p in zip(before, params)], loss


def test_micro_batches_accumulate_to_the_big_batch_step(tmp_path):
    """A global batch of 30 as one forward, or as micro-batches 8 + 8 + 8 + 6 (each loss weighted by its share):
    the same gradient (SGD lr 1: the update is the gradient) and the same reported mean loss."""
    whole, loss_whole = one_sgd_step(tmp_path / "a", 30)
    parts, loss_parts = one_sgd_step(tmp_path / "b", 8)
    assert loss_parts == pytest.approx(loss_whole, rel=1e-5)
    for a, b in zip(whole, parts):          # float32 sums in another order (each micro-batch's text cut at its own
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()      # last EOT): relative to scale


def test_clip_grad_bounds_the_gradient_norm(tmp_path):
    """--clip-grad c below the raw gradient's total norm: the update of one SGD step (the clipped gradient) has total
    norm c and the raw gradient's direction."""
    raw, _ = one_sgd_step(tmp_path / "a", 30)
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in raw)))
    c = norm / 4
    clipped, _ = one_sgd_step(tmp_path / "b", 30, clip=c)
    assert float(torch.sqrt(sum((g ** 2).sum() for g in clipped))) == pytest.approx(c, rel=1e-4)
    for a, b in zip(raw, clipped):
        assert (a / 4 - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("warmup_start", ["zero", "one-step"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_follows_its_formula(schedule, warmup_start):
    """After W = 10 warm-up steps of 100 (lr s / W at step s, or (s + 1) / W with --warmup-start one-step):
    linear 1 - p, cosine (1 + cos(pi p)) / 2, constant 1, with p = (s - W) / (100 - W); written out step by step."""
    from argparse import Namespace
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = common.make_schedule(opt, 100, Namespace(warmup=0.1, schedule=schedule, warmup_start=warmup_start))
    shift = 1 if warmup_start == "one-step" else 0
    for s in range(100):
        p = (s - 10) / 90
        expected = (s + shift) / 10 if s < 10 else {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2,
                                                    "constant": 1.0}[schedule]
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * expected, abs=1e-12), s
        opt.step()
        sched.step()


@pytest.mark.parametrize("total", [100, 37])
def test_linear_schedule_equals_hf_polynomial_decay(total):
    """MAP / MemPrompt / DCP call transformers' get_polynomial_decay_schedule_with_warmup (lr_end 0, power 1) with
    W = int(warmup * max_steps): --warmup-start zero with --schedule linear is that schedule, step for step."""
    from argparse import Namespace
    from transformers import get_polynomial_decay_schedule_with_warmup
    ours_opt, hf_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2) for _ in range(2))
    ours = common.make_schedule(ours_opt, total, Namespace(warmup=0.1, schedule="linear", warmup_start="zero"))
    hf = get_polynomial_decay_schedule_with_warmup(hf_opt, int(0.1 * total), total, lr_end=0, power=1)
    for s in range(total + 2):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(hf_opt.param_groups[0]["lr"], abs=1e-15), s
        for o, sc in ((ours_opt, ours), (hf_opt, hf)):
            o.step()
            sc.step()


def test_global_batches_are_a_fresh_permutation_each_epoch():
    """Every epoch: disjoint batches of batch_size and the incomplete last one (kept, as the official loaders'
    drop_last False), covering every sample, drawn anew each epoch and for each seed, and the same on every call
    (every rank computes them). Only a remainder smaller than min_last (the number of processes) is dropped."""
    from data import global_batches
    a0, a1, b0 = global_batches(103, 10, 4, 0), global_batches(103, 10, 4, 1), global_batches(103, 10, 5, 0)
    for batches in (a0, a1, b0):
        flat = [i for b in batches for i in b]
        assert [len(b) for b in batches] == [10] * 10 + [3] and sorted(flat) == list(range(103))
    assert a0 == global_batches(103, 10, 4, 0) and a0 != a1 and a0 != b0
    assert global_batches(103, 10, 4, 0, min_last=3) == a0 and global_batches(103, 10, 4, 0, min_last=4) == a0[:-1]
    assert global_batches(7, 10, 0, 0)[0] and sorted(global_batches(7, 10, 0, 0)[0]) == list(range(7))
    assert len(global_batches(7, 10, 0, 0, min_last=8)) == 1


def test_predictions_never_see_dropout(tmp_path):
    """predict (validation checks, test, grid) puts the model in eval mode: left in training mode, as fit leaves it at
    a check, with --backbone-dropout 0.1, it predicts exactly what the same model predicts with dropout 0."""
    import map
    argv = ["--backbone", "tiny-vilt", "--backbone-dropout", "0.1", "--prompt-length", "2", "--out", str(tmp_path)]
    run = common.setup(common.finalize_args(map.parser().parse_args(argv)))
    torch.manual_seed(0)
    model = map.MAP(run.bb, run.num_outputs, "input", 2, 2).train()
    with_dropout_flag = common.predict(run, model, run.val_set)
    run.bb.set_dropout(0.0)
    assert np.allclose(with_dropout_flag, common.predict(run, model, run.val_set), atol=1e-6, rtol=0)


def test_scores_from_logits_per_task():
    """Multiclass softmax, multilabel sigmoid per class, binary p(1) of the 2-logit softmax = sigmoid(l1 - l0)."""
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(common.scores_from_logits(logits, "multiclass"), logits.exp() / logits.exp().sum(1, True))
    assert torch.allclose(common.scores_from_logits(logits, "multilabel"), 1 / (1 + (-logits).exp()))
    two = logits[:, :2]
    assert torch.allclose(common.scores_from_logits(two, "binary"), 1 / (1 + (two[:, 0] - two[:, 1]).exp()))


# ---------------------------------------------------------------------------------------------------------
# Item 7: similarity logits in fp32 with autocast off
# ---------------------------------------------------------------------------------------------------------
def test_fp32_logits_escape_bf16_autocast():
    g = torch.Generator().manual_seed(8)
    u = torch.randn(16, 64, generator=g, requires_grad=True)
    z = torch.randn(32, 64, generator=g)
    exact = u.double() @ z.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = u.float() @ z.float().T                             # autocast still runs it in bf16
        with common.fp32_logits(u, z) as (a, b):
            logits = a @ b.T
        after = u @ z.T                                             # autocast is back outside the block
    assert plain.dtype == after.dtype == torch.bfloat16 and (plain.double() - exact).abs().max() > 1e-3
    assert logits.dtype == torch.float32 and (logits.double() - exact).abs().max() <= 1e-5
    logits.sum().backward()
    assert torch.allclose(u.grad, z.sum(0).expand_as(u), atol=1e-5)


MUTATIONS = [
    {"file": "common.py", "old": "(loss * (len(ids) * run.world / len(batch_ids))).backward()", "new": "loss.backward()", "why": "micro-batch losses summed, not weighted by their share of the global batch", "tests": ["tests/test_recipe.py::test_micro_batches_accumulate_to_the_big_batch_step"]},
    {"file": "common.py", "old": "total += loss.detach() * len(ids)", "new": "total += loss.detach()", "why": "the reported training loss is not the mean over the batch's samples", "tests": ["tests/test_recipe.py::test_micro_batches_accumulate_to_the_big_batch_step"]},
    {"file": "common.py", "old": "torch.nn.utils.clip_grad_norm_(params, args.clip_grad)", "new": "torch.nn.utils.clip_grad_norm_(params, 2 * args.clip_grad)", "why": "gradients clipped at twice --clip-grad", "tests": ["tests/test_recipe.py::test_clip_grad_bounds_the_gradient_norm"]},
    {"file": "common.py", "old": "return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))", "new": "return math.cos(0.5 * math.pi * min(1.0, progress))", "why": "cosine schedule is a quarter cosine, not (1 + cos(pi p)) / 2", "tests": ["tests/test_recipe.py::test_schedule_follows_its_formula"]},
    {"file": "common.py", "old": "max(0.0, 1.0 - progress)", "new": "max(0.0, 1.0 - 0.9 * progress)", "why": "linear decay does not reach 0 at the last step", "tests": ["tests/test_recipe.py::test_schedule_follows_its_formula"]},
    {"file": "data.py", "old": "manual_seed(seed * 1000003 + epoch)", "new": "manual_seed(seed * 1000003)", "why": "every epoch sees the same batches", "tests": ["tests/test_recipe.py::test_global_batches_are_a_fresh_permutation_each_epoch"]},
    {"file": "data.py", "old": "return batches if len(batches) == 1 or len(batches[-1]) >= min_last else batches[:-1]", "new": "return batches if len(batches) == 1 or len(batches[-1]) == batch_size else batches[:-1]", "why": "the incomplete last global batch is dropped (official: drop_last False)", "tests": ["tests/test_recipe.py::test_global_batches_are_a_fresh_permutation_each_epoch"]},
    {"file": "data.py", "old": "len(batches[-1]) >= min_last else", "new": "len(batches[-1]) >= 1 else", "why": "a last batch smaller than the number of processes is kept (a rank without a sample)", "tests": ["tests/test_recipe.py::test_global_batches_are_a_fresh_permutation_each_epoch"]},
    {"file": "common.py", "old": "shift = 1 if args.warmup_start == \"one-step\" else 0", "new": "shift = 1", "why": "warm-up (s + 1) / W where MAP's HF schedule gives s / W", "tests": ["tests/test_recipe.py::test_linear_schedule_equals_hf_polynomial_decay"]},
    {"file": "common.py", "old": "    return logits.float().softmax(-1)[:, 1]", "new": "    return logits.float()[:, 1].sigmoid()", "why": "binary p(1) from one logit, not the 2-logit softmax", "tests": ["tests/test_recipe.py::test_scores_from_logits_per_task"]},
    {"file": "common.py", "old": "    if task == \"multilabel\":\n        return logits.float().sigmoid()", "new": "    if task == \"multilabel\":\n        return logits.float().softmax(-1)", "why": "multi-label scores softmaxed across genres", "tests": ["tests/test_recipe.py::test_scores_from_logits_per_task"]},
    {"file": "common.py", "old": "attn_mask=bias.to(q.dtype))", "new": "attn_mask=None)",
     "why": "SDPA block ignores the key mask"},
    {"file": "common.py", "old": "k, v = torch.cat([K_p.to(k.dtype), k], 1), torch.cat([V_p.to(v.dtype), v], 1)",
     "new": "k, v = torch.cat([K_p.to(k.dtype), k], 1), torch.cat([K_p.to(v.dtype), v], 1)",
     "why": "the value prefix is the key prefix"},
    {"file": "common.py", "old": "bias = torch.cat([bias.new_zeros(*bias.shape[:-1], K_p.shape[1]), bias], -1)",
     "new": "bias = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], K_p.shape[1])], -1)",
     "why": "the prefix's zero bias is put after the tokens' keys (masks the wrong keys)"},
    {"file": "common.py", "old": "m = self.drop(layer.intermediate(layer.layernorm_after(x)))",
     "new": "m = self.drop(layer.intermediate(layer.layernorm_before(x)))",
     "why": "MLP pre-norm uses the attention LayerNorm"},
    {"file": "common.py", "old": "layer.layernorm_before.eps = layer.layernorm_after.eps = VIT_LAYER_NORM_EPS",
     "new": "pass", "why": "encoder LayerNorms keep HF's eps 1e-12"},
    {"file": "common.py", "old": "model.layernorm.eps = VIT_LAYER_NORM_EPS", "new": "pass",
     "why": "the final LayerNorm keeps HF's eps 1e-12"},
    {"file": "common.py", "old": "self.dropout_active = bool(mode) and self.dropout > 0",
     "new": "self.dropout_active = False", "why": "no backbone dropout while the method trains (the old forced eval)"},
    {"file": "common.py", "old": "self.dropout_active = bool(mode) and self.dropout > 0",
     "new": "self.dropout_active = self.dropout > 0", "why": "backbone dropout also at evaluation"},
    {"file": "common.py", "old": "m = self.drop(layer.intermediate(layer.layernorm_after(x)))",
     "new": "m = layer.intermediate(layer.layernorm_after(x))", "why": "no dropout after the MLP activation (HF's ViltLayer)"},
    {"file": "common.py", "old": "self.vilt.embeddings.dropout.p = self.vilt.embeddings.text_embeddings.dropout.p = p",
     "new": "self.vilt.embeddings.dropout.p = p", "why": "no text-embedding dropout"},
    {"file": "common.py", "old": "self.vilt.embeddings.dropout.train(self.dropout_active)", "new": "pass",
     "why": "no image-embedding (pos_drop) dropout"},
    {"file": "common.py", "old": 'mode="bilinear", align_corners=False)[0, 0]', "new": 'mode="bilinear", align_corners=True)[0, 0]',
     "why": "text positions stretched with align_corners=True (the previous formula)"},
    {"file": "common.py", "old": 'args.decay_exempt == "bias-norm" and any(k in n for k in NO_DECAY)',
     "new": 'args.decay_exempt == "bias-norm" and any(k in n for k in NO_DECAY[1:])', "why": "biases decayed"},
    {"file": "common.py", "old": '"norm2.bias", "norm2.weight")', "new": '"norm2.bias", "norm2.weight", ".1.weight")',
     "why": "the LayerNorm inside an nn.Sequential head exempt (official decays it)"},
    {"file": "common.py", "old": '{"params": exempt, "weight_decay": 0.0}', "new": '{"params": exempt, "weight_decay": args.weight_decay}',
     "why": "the exempt group decays anyway (the previous single group)"},
    {"file": "common.py", "old": "every = max(1, int(interval * steps))", "new": "every = steps",
     "why": "validation once per epoch whatever --val-interval says"},
    {"file": "common.py", "old": "best.update(metric=score, epoch=epoch, step=step, state=method_state(model))",
     "new": "best.update(metric=score, epoch=epoch, step=step, state=method_state(model)) if step == steps else None",
     "why": "model selection only among epoch-end checks"},
    {"file": "common.py", "old": "schedule.last_epoch - epoch * len(batches)", "new": "0",
     "why": "a resumed mid-epoch run restarts the epoch from its first batch"},
    {"file": "common.py", "old": 'return meta["epoch"] + (1 if meta["epoch_end"] else 0)', "new": 'return meta["epoch"] + 1',
     "why": "a resumed mid-epoch run skips the rest of the epoch"},
    {"file": "data.py", "old": "generator=torch.Generator().manual_seed(run.args.seed))", "new": "generator=None)",
     "why": "opening a loader draws from the global RNG, so a resumed run's dropout masks drift"},
    {"file": "common.py", "old": "with torch.autocast(tensors[0].device.type, enabled=False):",
     "new": "with contextlib.nullcontext():", "why": "fp32_logits leaves autocast on (bf16 similarity logits)"},
]
