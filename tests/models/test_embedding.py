import socket

import pytest
import safetensors.torch
import timm
import torch

from arcfold.config import load_config
from arcfold.errors import CorruptFileError
from arcfold.models.embedding import build_model, embedding_checkpoint, load_embedding_model


def _cfg(*overrides):
    return load_config(None, ["model.backbone=resnet10t", "model.embedding_size=32", *overrides])


@pytest.mark.parametrize("pool, neck", [("gem", "linear_bn_prelu"), ("avg", "linear_bn")])
def test_embedding_shapes(pool, neck):
    model = build_model(_cfg(f"model.pool={pool}", f"model.neck={neck}").model).eval()
    x = torch.randn(3, 3, 32, 32)
    assert model.forward_features(x).shape[:2] == (3, model.backbone.num_features)
    assert model(x).shape == (3, 32)
    norms = model.embed(x).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))


def test_checkpoint_rebuilds_the_model_alone(tmp_path):
    cfg = _cfg("model.pool=gem")
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        model.pool.p.fill_(2.5)  # a trained, non-default value must survive
    torch.save(embedding_checkpoint(model, cfg, fold=0), tmp_path / "fold0.pt")
    loaded, loaded_cfg, ckpt = load_embedding_model(tmp_path / "fold0.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded_cfg.model == cfg.model and ckpt["fold"] == 0


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "fold0.pt"
    torch.save(embedding_checkpoint(build_model(_cfg().model), _cfg()), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_embedding_model(path)


def test_pretrained_path_loads_local_weights_without_network(tmp_path, monkeypatch):
    # a "downloaded" timm checkpoint with its classifier, as a Kaggle data set would hold it
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = build_model(_cfg(f"model.pretrained_path={tmp_path / 'resnet10t.pth'}").model)
    torch.testing.assert_close(model.backbone.conv1[0].weight, source.conv1[0].weight)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_model(_cfg(f"model.pretrained_path={tmp_path / 'missing.pth'}").model)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(RuntimeError, match="does not fit backbone 'resnet10t'"):
        build_model(_cfg(f"model.pretrained_path={tmp_path / 'resnet18.pth'}").model)


@pytest.mark.parametrize("kind", ["text.safetensors", "truncated.safetensors", "truncated.pth"])
def test_pretrained_path_that_is_not_a_weights_file_is_one_error_naming_it(tmp_path, kind):
    weights = timm.create_model("resnet10t").state_dict()
    path = tmp_path / kind
    if kind == "text.safetensors":
        path.write_text("<html>403 Forbidden</html>")  # what a failed download leaves
    elif kind == "truncated.safetensors":
        safetensors.torch.save_file(weights, path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        torch.save(weights, path)
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptFileError, match=rf"^cannot read model.pretrained_path={path}: truncated, corrupt"):
        build_model(_cfg(f"model.pretrained_path={path}").model)


@pytest.mark.parametrize(
    "neck, n_params, n_buffers",
    [
        ("gp", 0, 0),
        ("gp_bn", 2, 3),
        ("dp_gp", 0, 0),
        ("bn_gp", 2, 3),
        ("bn_dp_gp_bn", 4, 6),
        ("linear_bn", 3, 3),
        ("linear_bn_prelu", 4, 3),
    ],
)
def test_every_neck_builds_the_layers_its_name_lists(neck, n_params, n_buffers):
    # resnet10t has 512 channels: the pool-only necks keep them
    cfg = _cfg(f"model.neck={neck}", "model.embedding_size=512", "model.drop_rate=0.5", "model.pool=avg")
    model = build_model(cfg.model)
    neck_modules = [model.pre_pool, model.neck]
    assert sum(len(list(m.parameters())) for m in neck_modules) == n_params
    assert sum(len(list(m.buffers())) for m in neck_modules) == n_buffers
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert model(x).shape == (4, 512)
    # eval mode is deterministic (dropout off); train mode with dropout is not
    torch.testing.assert_close(model(x), model(x))
    if "dp" in neck:
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_pool_only_neck_equals_the_pooled_features():
    model = build_model(_cfg("model.neck=gp", "model.embedding_size=512", "model.pool=avg").model).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model.forward_features(x).mean(dim=(2, 3)))


def test_bn_before_pool_normalises_the_feature_map():
    model = build_model(_cfg("model.neck=bn_gp", "model.embedding_size=512", "model.pool=avg").model).eval()
    bn = model.pre_pool[0]
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    x = torch.randn(2, 3, 32, 32)
    expected = (model.forward_features(x).mean(dim=(2, 3)) - 1.0) / (4.0 + bn.eps) ** 0.5
    torch.testing.assert_close(model(x), expected)


def test_neck_errors_name_the_fix():
    with pytest.raises(ValueError, match="model.embedding_size=512"):
        build_model(_cfg("model.neck=gp_bn", "model.embedding_size=128").model)
    with pytest.raises(ValueError, match="model.drop_rate > 0"):
        build_model(_cfg("model.neck=dp_gp", "model.embedding_size=512").model)
    with pytest.raises(ValueError, match="unknown"):
        build_model(_cfg("model.neck=option_d").model)


def test_output_stride_keeps_the_weights_and_doubles_the_last_map(tmp_path):
    default = build_model(_cfg().model).eval()
    cfg = _cfg("model.output_stride=16")
    dilated = build_model(cfg.model).eval()
    # the same parameters (a checkpoint or pretrained file of the plain backbone loads), a 2x larger last map
    shapes = {k: v.shape for k, v in default.state_dict().items()}
    assert shapes == {k: v.shape for k, v in dilated.state_dict().items()}
    dilated.load_state_dict(default.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert default.forward_features(x).shape[-2:] == (2, 2) and dilated.forward_features(x).shape[-2:] == (4, 4)
    # the stages before the last are strided as before: their output is the default model's exactly
    b0, b1 = default.backbone, dilated.backbone
    stem = lambda b: b.layer3(b.layer2(b.layer1(b.maxpool(b.act1(b.bn1(b.conv1(x)))))))  # noqa: E731
    torch.testing.assert_close(stem(b1), stem(b0))
    # the key travels with the checkpoint
    torch.save(embedding_checkpoint(dilated, cfg, fold=0), tmp_path / "fold0.pt")
    loaded, loaded_cfg, _ = load_embedding_model(tmp_path / "fold0.pt")
    assert loaded_cfg.model.output_stride == 16
    torch.testing.assert_close(loaded(x), dilated(x))


def test_output_stride_error_names_the_values():
    with pytest.raises(ValueError, match=r"model.output_stride is 8, 16, 32 or null \(got 12\)"):
        _cfg("model.output_stride=12")


def test_drop_path_rate_is_timms_stochastic_depth():
    default = build_model(_cfg().model)
    dropped = build_model(_cfg("model.drop_path_rate=0.5").model)
    for m in default.modules():  # timm zero-inits each block's last BatchNorm: a dropped branch would add 0 anyway
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    dropped.load_state_dict(default.state_dict())  # the same parameters
    probs = [m.drop_prob for m in dropped.modules() if isinstance(m, timm.layers.DropPath)]
    n = sum(isinstance(m, timm.models.resnet.BasicBlock) for m in dropped.modules())
    # timm's linear rule over the n residual blocks: 0 for the first (no DropPath), the rate for the last
    assert n >= 4 and probs == pytest.approx([0.5 * i / (n - 1) for i in range(1, n)])
    x = torch.randn(4, 3, 64, 64)
    default.eval()
    dropped.eval()
    torch.testing.assert_close(dropped(x), default(x))  # off at evaluation
    dropped.train()
    torch.manual_seed(0)
    first = dropped(x)
    assert not torch.allclose(dropped(x), first)  # branches dropped at random in training
    with pytest.raises(ValueError, match=r"model.drop_path_rate is in \[0, 1\) \(got 1.0\)"):
        _cfg("model.drop_path_rate=1.0")


def test_a_backbone_without_the_timm_argument_is_a_one_line_error():
    # timm's VisionTransformer has no output_stride: its TypeError about a constructor argument names the config key
    cfg = _cfg("model.backbone=vit_tiny_patch16_224", "model.output_stride=16")
    with pytest.raises(ValueError, match=r"model.output_stride=16: timm's 'vit_tiny_patch16_224' does not take"):
        build_model(cfg.model)
