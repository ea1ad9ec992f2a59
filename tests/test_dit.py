"""DiT, Euler solvers and DiT loading: parity with the official fixtures plus structural properties."""

from __future__ import annotations

import pytest
import torch

from kimia.detokenizer.dit import DiT, DiTConfig, count_params, to_timestep
from kimia.detokenizer.loader import (
    DIT_FOLDER,
    convert_official_detokenizer,
    load_dit,
    read_official_config,
    save_dit,
)
from kimia.detokenizer.solver import SOLVERS, draw_noise, euler_solve, make_t_span, solver_steps
from kimia.errors import BudgetError, CheckpointError, ConfigError
from tests.reference import assert_close, fixture_params, require

KIND = "detokenizer"



def _fixture_dit(fx):
    return load_dit(fx.path / DIT_FOLDER)


def _random_dit(seed=0, **over) -> DiT:
    cfg = DiTConfig(**{**dict(semantic_vocab_size=50, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0), **over})
    g = torch.Generator().manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():  # non-zero adaLN so every path matters
        for p in model.parameters():
            std = p.shape[1] ** -0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_velocity_matches_reference(fx):
    fx = require(fx, KIND)
    dit, exp, info = _fixture_dit(fx), fx.tensors(), fx.json("detok_info.json")
    names = sorted({k.split(".")[0] for k in exp if k.startswith("velocity")})
    assert names, "fixture has no velocity cases"
    for name in names:
        x, t = exp[f"{name}.x"], exp[f"{name}.t"]
        tokens = exp[f"{name}.cond_tokens"].reshape(1, -1)
        ts = to_timestep(t, 1)
        assert int(ts) == info[name]["timestep_int"]
        start = info[name]["start_position_id"]
        pos = torch.arange(start, start + x.shape[1])[None]
        with torch.no_grad():
            out = dit(x, tokens, ts, pos)
        assert_close(out, exp[f"{name}.out"], fx.tol("velocity"), name)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_chunk_mel_matches_reference_for_both_solvers(fx):
    fx = require(fx, KIND)
    dit, exp, info = _fixture_dit(fx), fx.tensors(), fx.json("detok_info.json")
    up = info["upsample_factor"]
    tested = 0
    for solver in SOLVERS:
        if f"chunk_{solver}.noise" not in exp:
            continue
        noise = exp[f"chunk_{solver}.noise"][None]
        frames = noise.shape[1]
        tokens = exp["semantic_tokens"][:, : frames // up].repeat_interleave(up, dim=1)
        pos = torch.arange(frames)[None]
        with torch.no_grad():
            mel = euler_solve(lambda t, x: dit(x, tokens, to_timestep(t, 1), pos), noise, make_t_span(info["ode_steps"]), solver)
        assert_close(mel[0], exp[f"chunk_{solver}.mel"], fx.tol("chunk_mel"), f"chunk {solver}")
        tested += 1
    assert tested == len(SOLVERS)


# ----------------------------------------------------------------------------------------- config
def test_presets_and_config_errors():
    assert DiTConfig.from_name("tiny").hidden_size == 64
    small = count_params(DiTConfig.from_name("small"))
    assert 40e6 < small < 60e6, small
    # the release's parameter count (KIMI_AUDIO.md 6.1: 1 584 023 120, consistent with the 19 GB file)
    assert count_params(DiTConfig.from_name("kimi-audio")) == 1_584_023_120
    with pytest.raises(ConfigError, match="ffn_type"):
        DiTConfig(ffn_type="conv1d_conv1d")
    with pytest.raises(ConfigError, match="even"):
        DiTConfig(hidden_size=36, num_heads=4)
    with pytest.raises(ConfigError, match="preset"):
        DiTConfig.from_name("huge")


def test_bad_inputs_raise_typed_errors():
    dit = _random_dit()
    x = torch.randn(1, 4, 80)
    with pytest.raises(ConfigError, match="semantic token ids"):
        dit(x, torch.tensor([[0, 1, 2, 99]]), torch.tensor([0]), torch.arange(4)[None])
    with pytest.raises(BudgetError, match="position"):
        dit(x, torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]), torch.arange(4094, 4098)[None])


# ----------------------------------------------------------------------------------------- properties
def test_kv_cache_equals_explicit_block_attention():
    """Chunk B attending over committed chunk A through the cache == one non-causal pass over [A ; B],
    rows of B. With one layer the keys/values of A depend on A alone in both cases, so they must agree."""
    dit = _random_dit(depth=1)
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(1, 6, 80, generator=g), torch.randn(1, 5, 80, generator=g)
    ta, tb = torch.randint(0, 50, (1, 6), generator=g), torch.randint(0, 50, (1, 5), generator=g)
    ts = torch.tensor([300])
    with torch.no_grad():
        cache = dit.new_cache(1, 4)  # too small on purpose: must grow
        dit(xa, ta, ts, torch.arange(6)[None], cache)
        cache.commit(6)
        dit(xb * 5, tb, ts, torch.arange(6, 11)[None], cache)  # overwritten by the next call
        out_b = dit(xb, tb, ts, torch.arange(6, 11)[None], cache)
        full = dit(torch.cat([xa, xb], 1), torch.cat([ta, tb], 1), ts, torch.arange(11)[None])
    assert cache.length == 6
    torch.testing.assert_close(out_b, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_cache_trim_keeps_newest_frames():
    dit = _random_dit()
    cache = dit.new_cache(1, 20)
    x, tok = torch.randn(1, 10, 80), torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        dit(x, tok, torch.tensor([999]), torch.arange(10)[None], cache)
    cache.commit(10)
    keep = [k[:, :, 6:10].clone() for k in cache.k]
    cache.trim(4)
    assert cache.length == 4
    for a, b in zip(cache.k, keep):
        torch.testing.assert_close(a[:, :, :4], b)


def test_batch_equals_single_rows():
    dit = _random_dit()
    g = torch.Generator().manual_seed(2)
    x, tok = torch.randn(3, 7, 80, generator=g), torch.randint(0, 50, (3, 7), generator=g)
    ts, pos = torch.tensor([10, 500, 999]), torch.arange(3, 10)[None].expand(3, 7)
    with torch.no_grad():
        out = dit(x, tok, ts, pos)
        for i in range(3):
            torch.testing.assert_close(out[i : i + 1], dit(x[i : i + 1], tok[i : i + 1], ts[i : i + 1], pos[i : i + 1]), atol=1e-5, rtol=1e-4)


def test_fewer_steps_and_solver_schedules():
    calls = []

    def v(t, x):
        calls.append(float(t))
        return torch.ones_like(x)

    x0 = torch.zeros(1, 2, 80)
    for steps in (30, 10):
        for solver in SOLVERS:
            calls.clear()
            x1 = euler_solve(v, x0, make_t_span(steps), solver)
            assert len(calls) == solver_steps(solver, steps)
            assert calls[0] == 0.0
            # a constant unit velocity integrates to the covered time span
            expected = 1.0 if solver == "neural_ode_euler" else 1.0 - 1e-4
            torch.testing.assert_close(x1, torch.full_like(x1, expected), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        euler_solve(v, x0, make_t_span(5), "rk4")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(draw_noise((2, 3), g1), draw_noise((2, 3), g2))


# ----------------------------------------------------------------------------------------- loading
def _write_official(folder, dit: DiT, cfg_text: str, drop: str | None = None, extra: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg_text)
    sd = {f"speech_model.{k}": v for k, v in dit.state_dict().items() if k != drop}
    if extra:
        sd[f"speech_model.{extra}"] = torch.zeros(3)
    sd["optimizer.state.0"] = torch.zeros(2)  # other training state is ignored
    torch.save({"state_dict": sd}, folder / "model.pt")


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_fake_official_folder_errors_name_the_key(fx, tmp_path):
    fx = require(fx, KIND)
    cfg_text = (fx.path / DIT_FOLDER / "config.yaml").read_text()
    dit = _fixture_dit(fx)
    _write_official(tmp_path / "missing", dit, cfg_text, drop="blocks.1.mlp.fc2.bias")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        load_dit(tmp_path / "missing")
    _write_official(tmp_path / "extra", dit, cfg_text, extra="blocks.9.attn.qkv.weight")
    with pytest.raises(CheckpointError, match=r"blocks\.9\.attn\.qkv\.weight"):
        load_dit(tmp_path / "extra")
    with pytest.raises(CheckpointError, match="neither"):
        load_dit(tmp_path)
    bad = tmp_path / "badcfg"
    _write_official(bad, dit, cfg_text.replace("vanilla_mlp", "conv1d_conv1d"))
    with pytest.raises(ConfigError, match="ffn_type"):
        load_dit(bad)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_conversion_round_trip(fx, tmp_path):
    fx = require(fx, KIND)
    src = fx.path / DIT_FOLDER
    original = load_dit(src)
    convert_official_detokenizer(src, tmp_path / "native")
    native = load_dit(tmp_path / "native")
    assert native.cfg == read_official_config(src / "config.yaml")
    a, b = original.state_dict(), native.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # saving a native model again is stable, and dtype casting on load works
    save_dit(native, tmp_path / "again")
    half = load_dit(tmp_path / "again", dtype=torch.bfloat16)
    assert half.input_linear.weight.dtype == torch.bfloat16


def test_condition_per_token_run_equals_per_frame():
    """cond_rate=4 (adaLN once per upsampled token) gives the per-frame result, with and without cache."""
    dit = _random_dit()
    g = torch.Generator().manual_seed(3)
    x, tok = torch.randn(2, 12, 80, generator=g), torch.randint(0, 50, (2, 3), generator=g).repeat_interleave(4, 1)
    ts, pos = torch.tensor([7, 650]), torch.arange(5, 17)[None].expand(2, 12)
    with torch.no_grad():
        c1, c4 = dit.new_cache(2, 20), dit.new_cache(2, 20)
        for cache in (c1, c4):
            dit(x, tok, ts, pos, cache)
            cache.commit(12)
        per_frame = dit(x, tok, ts, pos + 12, c1)
        per_run = dit(x, tok, ts, pos + 12, c4, cond_rate=4)
        torch.testing.assert_close(per_run, per_frame, atol=1e-5, rtol=1e-4)
        with pytest.raises(ConfigError, match="cond_rate"):
            dit(x[:, :10], tok[:, :10], ts, pos[:, :10], cond_rate=4)
