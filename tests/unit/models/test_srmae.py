"""SR-MAE: shapes, every parameter used, finetune freezing, loading MAE weights, sizes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY_VIT
from toolkit.models import MODELS, apply_freeze, build_model, param_counts
from toolkit.models import load_weights as load_mae_weights
from toolkit.models.mae import MAE, MAEConfig
from toolkit.models.srmae import SRMAE, SRMAEConfig
from toolkit.runs import recipe

ROOT = Path(__file__).resolve().parents[3]
MODES = MODELS.get("srmae").freeze_modes


def tiny_sr(scale: int = 2, **overrides: object) -> SRMAE:
    torch.manual_seed(0)
    return SRMAE(**{**TINY_VIT, "sr_channels": 8, "scale": scale, **overrides})


def tiny_mae(**overrides: object) -> MAE:
    torch.manual_seed(1)
    return MAE(**{**TINY_VIT, **overrides})


def count(model: torch.nn.Module, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_is_hr_size_for_each_scale(scale: int, channels: int) -> None:
    model = tiny_sr(scale, in_chans=channels)
    lr = torch.rand(2, channels, 20 // scale, 20 // scale)
    out = model(lr)
    assert out.shape == (2, channels, 20, 20)
    assert torch.isfinite(out).all()
    # The residuals start small, so an untrained model is close to bicubic (a sane start).
    bicubic = F.interpolate(lr, size=(20, 20), mode="bicubic", align_corners=False)
    assert (out - bicubic).abs().mean().item() < 0.05


def test_rejects_wrong_lr_size() -> None:
    with pytest.raises(ValueError, match="10x10"):
        tiny_sr(2)(torch.rand(1, 1, 20, 20))


def test_predict_is_clamped_to_unit_range() -> None:
    model = tiny_sr(2)
    lr = torch.rand(2, 1, 10, 10) * 3 - 1  # bicubic of this overshoots [0, 1]
    out = model.predict(lr)
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert not out.requires_grad


def test_every_parameter_takes_part_in_forward() -> None:
    model = tiny_sr(3)
    model(torch.rand(2, 1, 6, 6)).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert unused == []
    assert "mask_token" not in dict(model.named_parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "decoder", "sr"}


def test_mae_part_has_the_same_names_and_shapes_as_the_mae() -> None:
    mae, sr = tiny_mae().state_dict(), tiny_sr().state_dict()
    mae_part = {k: v.shape for k, v in mae.items() if k != "mask_token"}
    assert mae_part == {k: v.shape for k, v in sr.items() if not k.startswith("sr.")}


def test_mae_part_built_from_one_seed_is_the_mae_exactly() -> None:
    # Both build and initialise their encoder and decoder first, in one place (EncoderDecoder),
    # drawing the same random numbers; the mask token and the sr.* layers come after.
    torch.manual_seed(0)
    mae = MAE(**TINY_VIT, drop_path=0.1).state_dict()
    torch.manual_seed(0)
    sr = SRMAE(**TINY_VIT, drop_path=0.1, sr_channels=8, scale=3).state_dict()
    mae_part = {k: v for k, v in mae.items() if k != "mask_token"}
    assert list(mae_part) == [k for k in sr if not k.startswith("sr.")]
    assert all(torch.equal(v, sr[k]) for k, v in mae_part.items())


@pytest.mark.parametrize(
    ("freeze", "trainable_prefixes"),
    [
        ([], ("encoder.", "decoder.", "sr.")),
        (["encoder"], ("decoder.", "sr.")),
        (["mae"], ("sr.",)),
    ],
)
def test_freeze_modes_count_and_training_changes_only_trainable(
    freeze: list[str], trainable_prefixes: tuple[str, ...]
) -> None:
    model = tiny_sr(2)
    apply_freeze(model, ["mae"], MODES)  # then another mode: the last call decides
    apply_freeze(model, freeze, MODES)
    total, trainable = param_counts(model)
    assert total == count(model, "")
    assert trainable == sum(count(model, p) for p in trainable_prefixes)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lr, hr = torch.rand(4, 1, 10, 10), torch.rand(4, 1, 20, 20)
    for _ in range(3):
        opt.zero_grad()
        F.l1_loss(model(lr), hr).backward()
        opt.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == name.startswith(trainable_prefixes), name


def test_freeze_by_parameter_name_and_unmatched_entries() -> None:
    model = tiny_sr()
    apply_freeze(model, [r"^decoder\.", "sr.tail"], MODES)  # regexes, not modes
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("decoder.", "sr.tail."))}  # fmt: skip
    with pytest.raises(ValueError, match="'nothing' matches no parameter"):
        apply_freeze(model, ["nothing"], MODES)


def test_load_from_mae_copies_encoder_decoder_and_reports_fresh_sr() -> None:
    mae, model = tiny_mae(), tiny_sr(2)
    sr_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("sr.")}
    report = load_mae_weights(model, mae.state_dict())
    sr_state, mae_state = model.state_dict(), mae.state_dict()
    mae_keys = [k for k in mae_state if k != "mask_token"]
    assert sorted(report.loaded) == sorted(mae_keys)
    for key in mae_keys:
        assert torch.equal(sr_state[key], mae_state[key]), key
    assert sorted(report.fresh) == sorted(sr_before)
    assert {k.split(".")[1] for k in report.fresh} == {
        "head",
        "up",
        "to_img",
        "fuse",
        "body",
        "tail",
    }
    for key, value in sr_before.items():
        assert torch.equal(sr_state[key], value)
    assert report.unused == ["mask_token"]
    assert "sr.up" in report.summary() and "mask_token" in report.summary()


def test_load_by_name_into_a_mae_from_srmae_leaves_mask_token_fresh() -> None:
    """Any direction between architectures sharing parts: SR-MAE's encoder and decoder into an
    MAE; its sr.* layers are unused, the mask token keeps its initialisation."""
    source, mae = tiny_sr(2), tiny_mae()
    report = load_mae_weights(mae, source.state_dict())
    assert report.fresh == ["mask_token"] and {k.split(".")[0] for k in report.unused} == {"sr"}


def test_load_from_srmae_checkpoint_loads_everything() -> None:
    source, model = tiny_sr(3), tiny_sr(3)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    # A DDP-wrapped state dict ("module." prefix) loads too.
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    report = load_mae_weights(model, wrapped)
    assert report.fresh == [] and report.unused == []
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_rejects_other_width_naming_tensor_and_shapes() -> None:
    model = tiny_sr(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wide = tiny_mae(embed_dim=64).state_dict()
    with pytest.raises(ValueError) as err:
        load_mae_weights(model, wide)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("encoder.patch_embed.proj.weight: checkpoint has [64, 1, 4, 4]")
    assert "model expects [32, 1, 4, 4]" in msg
    # Nothing was half-loaded.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_rejects_shape_mismatch_at_same_width() -> None:
    other_mlp = tiny_mae(mlp_ratio=4.0).state_dict()
    with pytest.raises(
        ValueError,
        match=r"encoder\.blocks\.0\.mlp\.fc1\.weight: checkpoint has "
        r"\[128, 32\], model expects \[64, 32\]$",
    ):
        load_mae_weights(tiny_sr(2), other_mlp)


def test_load_rejects_other_depth() -> None:
    with pytest.raises(ValueError, match=r"encoder\.blocks\.2\..*no place in the model"):
        load_mae_weights(tiny_sr(2), tiny_mae(depth=3).state_dict())
    with pytest.raises(ValueError, match=r"encoder\.blocks\.1\..*missing from the checkpoint"):
        load_mae_weights(tiny_sr(2), tiny_mae(depth=1).state_dict())


def test_load_rejects_checkpoint_sharing_no_tensor() -> None:
    state = {"conv.weight": torch.zeros(3), "mask_token": torch.zeros(1, 1, 16)}
    with pytest.raises(ValueError, match="no tensor of the checkpoint has a place"):
        load_mae_weights(tiny_sr(2), state)
    with pytest.raises(ValueError, match="no tensor of the checkpoint has a place"):
        load_mae_weights(tiny_sr(2), {})


def test_build_model_by_architecture() -> None:
    vit = {k: v for k, v in TINY_VIT.items()}
    mae = build_model(MAEConfig(arch="mae", in_chans=3, mask_ratio=0.5, norm_pix_loss=True, **vit))
    assert isinstance(mae, MAE) and mae.mask_ratio == 0.5 and mae.norm_pix_loss
    sr = build_model(SRMAEConfig(arch="srmae", in_chans=3, sr_channels=8, **vit), scale=4)
    assert isinstance(sr, SRMAE) and sr(torch.rand(1, 3, 5, 5)).shape == (1, 3, 20, 20)


def test_workload_sizes_match_the_write_up_within_10_percent() -> None:
    def near(value: int, reported: float) -> bool:
        return abs(value - reported) <= 0.1 * reported

    pretrain = recipe.load(ROOT / "recipes/pretrain.yaml").model
    finetune = recipe.load(ROOT / "recipes/finetune.yaml").model
    mae_total, _ = param_counts(build_model(pretrain))
    assert near(mae_total, 7.25e6), mae_total
    for scale in (2, 3, 4):  # kernel-4 deconv: the same counts at every scale
        model = build_model(finetune, scale=scale)
        total, trainable = param_counts(model)
        assert near(total, 7.38e6) and trainable == total, total
        apply_freeze(model, ["encoder"], MODES)
        assert near(param_counts(model)[1], 996e3), param_counts(model)
        apply_freeze(model, ["mae"], MODES)
        assert near(param_counts(model)[1], 167.7e3), param_counts(model)
