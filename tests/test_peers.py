"""ESD and UCE (sa_kit.sd.peers) against the official formulas, re-implemented here from scratch.

UCE: ``trainscripts/uce_sd_erase.py: UCE`` and ``train-scripts/train_erase.py: edit_model``
(rohitgandikota/unified-concept-editing). ESD: ``train-scripts/train-esd.py: train_esd``
(rohitgandikota/erasing). All on the tiny random pipeline, offline, one thread.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from sa_kit.sd import peers  # noqa: E402
from sa_kit.sd.adapter import is_cross_attention, trains_with  # noqa: E402
from sa_kit.sd.pipeline import load_pipeline  # noqa: E402


pytestmark = pytest.mark.usefixtures("sd_offline")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipeline(tiny_dir)


# -- UCE, re-implemented ----------------------------------------------------------------------

@torch.no_grad()
def _hidden(pipe, text):
    tok = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids)[0][0], int(tok.attention_mask.sum()) - 2


def _official_uce(pipe, erase, guide, preserve, lamb, erase_scale, preserve_scale):
    """uce_sd_erase.py: last token of each concept; W_new = mat1 @ inverse(mat2)."""
    emb = {}
    for text in erase + guide + preserve:
        h, last = _hidden(pipe, text)
        emb[text] = h[last][None].double()                     # t_emb[0][:, last_token_idx, :]
    out = {}
    for name, module in pipe.unet.named_modules():
        if "attn2" in name and (name.endswith("to_v") or name.endswith("to_k")):
            w_old = module.weight.detach().double()
            mat1 = lamb * w_old
            mat2 = lamb * torch.eye(w_old.shape[1], dtype=w_old.dtype)
            for e, g in zip(erase, guide):
                c_i, v_i = emb[e].T, (emb[g] @ w_old.T).T    # module(t_emb) with the old W
                mat1 = mat1 + erase_scale * (v_i @ c_i.T)
                mat2 = mat2 + erase_scale * (c_i @ c_i.T)
            for p in preserve:
                c_i, v_i = emb[p].T, (emb[p] @ w_old.T).T
                mat1 = mat1 + preserve_scale * (v_i @ c_i.T)
                mat2 = mat2 + preserve_scale * (c_i @ c_i.T)
            out[name] = (mat1 @ torch.linalg.inv(mat2)).float()
    return out


def _weights(folder):
    return dict(load_pipeline(str(folder)).unet.named_parameters())


def test_uce_matches_the_official_closed_form(pipe, tiny_dir):
    erase, guide, preserve = ["seven", "a red car"], ["one", ""], ["four", "blue"]
    r = peers.uce(tiny_dir, erase, guide, preserve, lamb=0.5, erase_scale=1.0,
                  preserve_scale=0.3)
    expected = _official_uce(pipe, erase, guide, preserve, 0.5, 1.0, 0.3)
    new, old = _weights(r["pipeline_dir"]), dict(pipe.unet.named_parameters())
    assert len(expected) == r["layers"] == 8 and r["trained"] == sum(
        new[k + ".weight"].numel() for k in expected)
    for name, w in expected.items():
        got = new[name + ".weight"]
        assert not torch.allclose(got, old[name + ".weight"])
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)
    for k, p in old.items():                                   # nothing else moved
        if k.removesuffix(".weight") not in expected:
            assert torch.equal(new[k], p), k


def test_uce_last_to_end_matches_train_erase(pipe):
    """train_erase.py: tokens from the last subject token to the end, aligned; preserve: all."""
    erase, guide, preserve, lamb = "a red car", "one", "blue", 0.5
    edited = copy.deepcopy(pipe)
    peers.uce_edit(edited, [erase], [guide], [preserve], lamb=lamb, erase_scale=1.0,
                   preserve_scale=0.1, tokens="last_to_end")
    (h_e, i_e), (h_g, i_g), (h_p, _) = (_hidden(pipe, t) for t in (erase, guide, preserve))
    far, n = max(i_e, i_g), h_e.shape[0]
    old_emb = h_e[i_e:n - max(0, far - i_e)]                   # edit_model's slicing, verbatim
    new_emb = h_g[i_g:n - max(0, far - i_g)]
    assert old_emb.shape == new_emb.shape and old_emb.shape[0] == n - far
    for name, module in pipe.unet.named_modules():
        if "attn2" in name and name.endswith(("to_k", "to_v")):
            w = module.weight.detach().double()             # float64: many keys, tight test
            o, g, q = old_emb.double(), new_emb.double(), h_p.double()
            mat1 = lamb * w + (g @ w.T).T @ o + 0.1 * (q @ w.T).T @ q
            mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype) + o.T @ o + 0.1 * q.T @ q
            got = dict(edited.unet.named_modules())[name].weight.double()
            torch.testing.assert_close(got, mat1 @ torch.inverse(mat2), rtol=1e-4, atol=1e-5)


def test_uce_without_erasing_keeps_every_weight(pipe):
    edited = copy.deepcopy(pipe)
    changed = peers.uce_edit(edited, ["seven"], ["one"], [], erase_scale=0.0)
    assert changed == sum(m.weight.numel() for m in peers.uce_projections(pipe.unet).values())
    for (k, a), (_, b) in zip(pipe.unet.named_parameters(), edited.unet.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)   # lamb W (lamb I)^-1 = W


def test_uce_sends_the_erased_key_to_the_guide_and_keeps_the_preserved(pipe):
    edited = copy.deepcopy(pipe)
    peers.uce_edit(edited, ["seven"], ["one"], ["four"], lamb=1e-3)
    (h7, i7), (h1, i1), (h4, i4) = (_hidden(pipe, t) for t in ("seven", "one", "four"))
    for name, module in peers.uce_projections(edited.unet).items():
        w_old = dict(pipe.unet.named_modules())[name].weight.detach()
        w_new = module.weight.detach()
        v_guide, v_keep = w_old @ h1[i1], w_old @ h4[i4]
        assert (w_new @ h7[i7] - v_guide).norm() < 0.02 * v_guide.norm()
        assert (w_new @ h4[i4] - v_keep).norm() < 0.02 * v_keep.norm()
        assert (w_old @ h7[i7] - v_guide).norm() > 0.2 * v_guide.norm()   # it did move


def test_uce_is_cached_and_checks_its_input(tiny_dir, monkeypatch):
    first = peers.uce(tiny_dir, "seven", "one")
    monkeypatch.setattr(peers, "uce_edit", lambda *a, **k: pytest.fail("recomputed"))
    again = peers.uce(tiny_dir, ["seven"], ["one"])
    assert again["pipeline_dir"] == first["pipeline_dir"] and again["seconds"] == first["seconds"]
    with pytest.raises(ValueError, match="guide must be one prompt or one per erased"):
        peers.uce(tiny_dir, ["seven", "six"], ["one", "two", "three"])
    with pytest.raises(ValueError, match="erase must"):
        peers.uce(tiny_dir, [])
    with pytest.raises(ValueError, match="erase must not contain empty"):
        peers.uce(tiny_dir, " ")
    with pytest.raises(ValueError, match="lamb must be a finite number > 0"):
        peers.uce(tiny_dir, "seven", lamb=0.0)
    with pytest.raises(ValueError, match="tokens must be one of"):
        peers.uce(tiny_dir, "seven", tokens="all")
    with pytest.raises(ValueError, match="model"):
        peers.uce("no/such/folder/here", "seven")


def test_preserve_for_reads_the_prompt_spec(tmp_path):
    from sa_kit.sd.digits import SPEC, WORDS
    SPEC.save(tmp_path)
    assert peers.preserve_for(tmp_path, "seven") == [w for w in WORDS if w != "seven"]
    assert "one" not in peers.preserve_for(tmp_path, "seven", exclude=["one"])
    assert peers.preserve_for(tmp_path, "red") == ["green", "blue", "yellow", "cyan", "magenta"]
    with pytest.raises(ValueError, match="not a value of the model's prompt spec"):
        peers.preserve_for(tmp_path, "a purple cow")


# -- ESD, re-implemented ----------------------------------------------------------------------

def _setup(pipe, n=5):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(n)
    return sched, peers._encode(pipe, ["seven"]), peers._encode(pipe, [""])


def test_esd_target_is_negative_guidance():
    e0, ep = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    assert torch.equal(peers.esd_target(e0, ep, 1.0), torch.tensor([-1.0, -5.0, 0.5]))  # 2e0-ep
    assert torch.equal(peers.esd_target(e0, ep, 0.0), e0)
    assert torch.equal(peers.esd_target(e0, ep, 2.5), e0 - 2.5 * (ep - e0))


def test_esd_noisy_latent_is_the_models_own_ddim_sample(pipe):
    """x_t after n-1-t_enc guided DDIM steps equals the pipeline's latents at that step."""
    sched, emb_c, emb_0 = _setup(pipe)
    seen = {}

    def keep(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw

    pipe(["seven"], num_inference_steps=5, guidance_scale=3.0, height=32, width=32,
         generator=torch.Generator().manual_seed(7), output_type="latent",
         callback_on_step_end=keep)
    for t_enc in (3, 1):
        x_t, t = peers.esd_noisy_latent(pipe.unet, sched, emb_c, emb_0, t_enc, 3.0, 1,
                                        torch.Generator().manual_seed(7))
        torch.testing.assert_close(x_t, seen[5 - 1 - t_enc - 1], rtol=1e-4, atol=1e-5)
        assert 200 * t_enc <= int(t) < 200 * (t_enc + 1)        # train-esd.py's og_num bins
    x_t, t = peers.esd_noisy_latent(pipe.unet, sched, emb_c, emb_0, 4, 3.0, 2,
                                    torch.Generator().manual_seed(7))
    torch.testing.assert_close(x_t[:1], torch.randn((1, 4, 4, 4),
                                                    generator=torch.Generator().manual_seed(7)))
    assert x_t.shape == (2, 4, 4, 4) and t.shape == (2,) and 800 <= int(t[0]) < 1000
    with pytest.raises(ValueError, match="t_enc must be in 0..4"):
        peers.esd_noisy_latent(pipe.unet, sched, emb_c, emb_0, 5)


def test_esd_loss_and_one_step_toward_the_target(pipe):
    sched, emb_c, emb_0 = _setup(pipe)
    unet, frozen = copy.deepcopy(pipe.unet), pipe.unet
    x_t, t = peers.esd_noisy_latent(unet, sched, emb_c, emb_0, 2, 3.0, 2,
                                    torch.Generator().manual_seed(0))
    with torch.no_grad():                                     # train-esd.py, from scratch
        e_0 = frozen(x_t, t, encoder_hidden_states=emb_0.expand(2, -1, -1)).sample
        e_p = frozen(x_t, t, encoder_hidden_states=emb_c.expand(2, -1, -1)).sample
        target = e_0 - 1.0 * (e_p - e_0)
        before = torch.nn.functional.mse_loss(
            unet(x_t, t, encoder_hidden_states=emb_c.expand(2, -1, -1)).sample, target)
    loss = peers.esd_loss(unet, frozen, x_t, t, emb_c, emb_0, 1.0)
    torch.testing.assert_close(loss, before)
    params = [p for n, p in unet.named_parameters() if trains_with(n, "noxattn")]
    opt = torch.optim.Adam(params, lr=1e-4)                   # one step, the kit's default lr
    loss.backward()
    opt.step()
    with torch.no_grad():
        e_n = unet(x_t, t, encoder_hidden_states=emb_c.expand(2, -1, -1)).sample
    assert torch.nn.functional.mse_loss(e_n, target) < 0.9 * before   # eps(x_t, c) -> target
    assert (e_n - target).norm() < (e_p - target).norm()          # e_p: where it started


def test_esd_run_trains_only_its_weights_and_is_cached(tiny_dir, pipe, monkeypatch):
    r = peers.esd(tiny_dir, "seven", steps=3, ddim_steps=4, lr=1e-3, train_method="noxattn",
                  progress=False)
    assert r["history"]["step"] == [1, 2, 3] and len(r["history"]["loss"]) == 3
    new, old = _weights(r["pipeline_dir"]), dict(pipe.unet.named_parameters())
    assert r["trained"] == sum(p.numel() for k, p in old.items() if trains_with(k, "noxattn"))
    for k, p in old.items():
        if not trains_with(k, "noxattn"):
            assert torch.equal(new[k], p), k                  # cross-attention, time, out: kept
    assert any(not torch.equal(new[k], p) for k, p in old.items() if trains_with(k, "noxattn"))
    x = peers.esd(tiny_dir, ["seven"], steps=2, ddim_steps=4, lr=1e-3, train_method="xattn",
                  progress=False)
    assert x["trained"] == sum(p.numel() for k, p in old.items() if is_cross_attention(k))
    monkeypatch.setattr(peers, "_train_esd", lambda *a, **k: pytest.fail("retrained"))
    again = peers.esd(tiny_dir, "seven", steps=3, ddim_steps=4, lr=1e-3, progress=False)
    assert again["pipeline_dir"] == r["pipeline_dir"] and again["history"] == r["history"]


@pytest.mark.parametrize("kw, match", [
    ({"forget_prompt": ""}, "forget_prompt must not contain empty"),
    ({"forget_prompt": 7}, "forget_prompt must be a prompt"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"train_method": "attn"}, "train_method must be one of"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"negative_guidance": -1.0}, "negative_guidance must be a finite number >= 0"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_esd_bad_input_is_one_clear_line(tiny_dir, kw, match):
    args = {"forget_prompt": "seven", **kw}
    with pytest.raises(ValueError, match=match) as err:
        peers.esd(tiny_dir, args.pop("forget_prompt"), progress=False, **args)
    assert "\n" not in str(err.value)
