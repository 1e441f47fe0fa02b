"""Backbones (registry, weights) and the fusion network (variants, gating, frozen backbone).

Never requests ImageNet weights: there is no network here, so ``"imagenet"`` is only checked to
resolve to torchvision's weights enum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posterfusion.models import (
    FusionConfig,
    build_model,
    create_backbone,
    list_backbones,
    register_backbone,
    resolve_weights,
)
from posterfusion.models.backbones import Backbone
from posterfusion.models.fusion import VARIANTS


@pytest.mark.parametrize(("name", "dim"), [("densenet121", 1024), ("resnet50", 2048), ("resnet34", 512),
                                           ("vgg16", 512), ("mobilenet_v2", 1280), ("keras_cnn", 64)])
def test_every_backbone_gives_pooled_features(name, dim):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    assert backbone.feature_dim == dim and features.shape == (2, dim)
    assert name in list_backbones()


def test_imagenet_resolves_to_torchvision_weights_without_downloading():
    from torchvision.models import DenseNet121_Weights, ResNet50_Weights, VGG16_Weights

    assert resolve_weights("densenet121", "imagenet") is DenseNet121_Weights.IMAGENET1K_V1
    assert isinstance(resolve_weights("resnet50", "imagenet"), ResNet50_Weights)
    assert isinstance(resolve_weights("vgg16", "imagenet"), VGG16_Weights)
    assert resolve_weights("keras_cnn", "none") is None
    with pytest.raises(ValueError, match="no ImageNet weights"):
        resolve_weights("keras_cnn", "imagenet")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("alexnet")
    with pytest.raises(ValueError, match="weights must be"):
        resolve_weights("keras_cnn", "imagenet21k")
    with pytest.raises(FileNotFoundError):
        resolve_weights("keras_cnn", "/nonexistent/weights.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_through_a_local_file(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_backbone("keras_cnn").eval()
    path = tmp_path / f"keras{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = create_backbone("keras_cnn", weights=str(path)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images))


def test_a_full_torchvision_state_dict_loads_with_its_classifier_ignored(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    torch.manual_seed(0)
    full = resnet50().eval()
    save_file(full.state_dict(), str(tmp_path / "resnet50.safetensors"))
    backbone = create_backbone("resnet50", weights=str(tmp_path / "resnet50.safetensors")).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(full.avgpool(full.layer4(full.layer3(full.layer2(full.layer1(
            full.maxpool(full.relu(full.bn1(full.conv1(images))))))))), 1)
        torch.testing.assert_close(backbone(images), expected)


def test_a_file_with_wrong_keys_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit backbone KerasCNN.*missing.*unexpected \(1\): conv.weight"):
        create_backbone("keras_cnn", weights=str(tmp_path / "wrong.safetensors"))
    state = create_backbone("keras_cnn").state_dict()
    state["head.0.weight"] = torch.zeros(5, 5)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"mis-shaped.*head.0.weight"):
        create_backbone("keras_cnn", weights=str(tmp_path / "shape.safetensors"))


def test_densenet_accepts_torchvision_checkpoint_key_names(tmp_path):
    """torchvision's hosted DenseNet checkpoint spells 'norm1' as 'norm.1' and carries a classifier."""
    import re

    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_backbone("densenet121").eval()
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
           for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}  # old: none
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    old |= {"classifier.weight": torch.zeros(1000, 1024), "classifier.bias": torch.zeros(1000)}
    save_file(old, str(tmp_path / "densenet.safetensors"))
    loaded = create_backbone("densenet121", weights=str(tmp_path / "densenet.safetensors")).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images))


def test_imagenet_weights_load_through_the_same_path(monkeypatch):
    """The 'imagenet' path, with torchvision's download replaced by a full ResNet-50 state dict."""
    from torchvision.models import ResNet50_Weights, resnet50

    torch.manual_seed(0)
    full = resnet50().state_dict()
    monkeypatch.setattr(ResNet50_Weights, "get_state_dict", lambda self, **kwargs: dict(full))
    backbone = create_backbone("resnet50", weights="imagenet")
    torch.testing.assert_close(backbone.conv1.weight, full["conv1.weight"])


def test_register_backbone_adds_a_name(monkeypatch):
    from posterfusion.models import backbones

    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))  # leave the real registry alone

    @register_backbone("tiny_test")
    class Tiny(Backbone):
        feature_dim = 3

        def forward(self, images):
            return images.mean(dim=(2, 3))

    assert "tiny_test" in list_backbones()
    assert create_backbone("tiny_test")(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_test")(Tiny)


G, OBJ, META = 5, 7, 11


FLAGS = [8, 9, 10]  # the metadata columns that are presence flags


PRESENCE = {"metadata_presence": 10, "object_presence": OBJ - 2}  # has_metadata; log1p(total objects)


def model_for(variant="fused", fusion="concat", **overrides):
    torch.manual_seed(0)
    config = FusionConfig(backbone="keras_cnn", variant=variant, fusion=fusion, num_genres=G,
                          object_dim=OBJ, metadata_dim=META, metadata_flags=FLAGS, hidden=16, **PRESENCE, **overrides)
    return build_model(config)


def inputs(n=3):
    return torch.randn(n, 3, 64, 64), torch.rand(n, OBJ), torch.rand(n, META)


@pytest.mark.parametrize("fusion", ["concat", "gated", "residual"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_gives_one_logit_per_genre(variant, fusion):
    model = model_for(variant, fusion).eval()
    images, objects, metadata = inputs()
    assert model(images, objects, metadata).shape == (3, G)
    assert model.embed(images, objects, metadata).shape == (3, 16)
    assert model.uses_objects == (variant in ("cnn+objects", "fused"))
    assert model.uses_metadata == (variant in ("cnn+metadata", "fused", "flags-only"))
    if variant == "cnn":
        assert model(images).shape == (3, G)  # side inputs are optional when unused
    pooled = model.backbone(images)  # the head alone, on stored backbone features, is the same function
    torch.testing.assert_close(model(pooled, objects, metadata, pooled=True), model(images, objects, metadata))


def test_flags_only_reads_nothing_but_the_presence_flags():
    model = model_for("flags-only").eval()
    images, objects, metadata = inputs()
    changed = metadata.clone()
    changed[:, :8] = torch.rand(3, 8) * 100  # every value column changes, no flag does
    torch.testing.assert_close(model(images, objects, changed), model(images, objects, metadata))
    flipped = metadata.clone()
    flipped[:, FLAGS] = 1 - flipped[:, FLAGS]
    assert not torch.allclose(model(images, objects, flipped), model(images, objects, metadata))
    with pytest.raises(ValueError, match="metadata_flags"):
        FusionConfig(variant="flags-only", num_genres=G, metadata_dim=META)


def _absent(objects: torch.Tensor, metadata: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The side inputs with ``rows`` marked missing: no metadata (has_metadata 0), nothing detected."""
    objects, metadata = objects.clone(), metadata.clone()
    objects[rows, PRESENCE["object_presence"]] = 0.0
    metadata[rows, PRESENCE["metadata_presence"]] = 0.0
    return objects, metadata


def test_residual_fusion_scores_a_poster_without_side_inputs_exactly_as_its_poster_path():
    model = model_for("fused", "residual").eval()
    images, objects, metadata = inputs()
    objects, metadata = _absent(objects, metadata, [0, 1])
    poster_only, correction = model(images, objects, metadata, split=True)
    assert torch.equal(correction[:2], torch.zeros(2, G)) and correction[2].abs().sum() > 0
    fused = model(images, objects, metadata)
    assert torch.equal(fused[:2], poster_only[:2])
    other = metadata.clone()
    other[:2, :8] = torch.rand(2, 8) * 10  # whatever a missing input's other columns hold
    assert torch.equal(model(images, objects, other)[:2], fused[:2])
    with pytest.raises(ValueError, match="metadata_presence"):
        FusionConfig(variant="fused", fusion="residual", num_genres=G, object_dim=OBJ, metadata_dim=META)


def test_residual_training_shapes_the_poster_path_by_its_own_loss_alone():
    """The side inputs' correction never pulls on the poster path: its gradients are those of a CNN-only loss."""
    from posterfusion.jobs.train.loop import fusion_loss

    images, objects, metadata = inputs()
    labels = (torch.rand(3, G) > 0.5).float()
    bce = torch.nn.BCEWithLogitsLoss()
    fused = model_for("fused", "residual").train()
    alone = model_for("fused", "residual").train()
    torch.manual_seed(1)
    fusion_loss(bce, *fused(images, objects, metadata, split=True), labels).backward()
    torch.manual_seed(1)  # the same dropout draws
    bce(alone(images, objects, metadata, split=True)[0], labels).backward()
    for (name, p), q in zip(fused.named_parameters(), alone.parameters(), strict=True):
        if name.startswith(("backbone.", "hidden.", "classifier.")):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert fused.corrections["metadata"][0].weight.grad.abs().sum() > 0  # the correction does learn


def test_a_side_correction_weighed_to_zero_leaves_the_poster_path_and_the_others_as_they_are():
    """``correction_scale`` (fitted on validation after training) weighs each side input's correction;
    ``branch_logits`` gives the parts it is fitted on, and they add up to what the network says."""
    from posterfusion.models.fusion import residual_logits

    model = model_for("fused", "residual").eval()
    images, objects, metadata = inputs()
    with torch.no_grad():
        parts = model.branch_logits(images, objects, metadata)
        assert set(parts) == {"poster", "objects", "metadata"} and parts["objects"].abs().sum() > 0
        torch.testing.assert_close(residual_logits(parts), model(images, objects, metadata))
        weighed = build_model(model.config.model_copy(update={"correction_scale": {"objects": 0.0, "metadata": 0.5}}))
        weighed.load_state_dict(model.state_dict())  # a weight is configuration, not a parameter
        torch.testing.assert_close(weighed.eval()(images, objects, metadata),
                                   parts["poster"] + 0.5 * parts["metadata"])
    with pytest.raises(ValueError, match="residual fusion only"):
        model_for("fused", "concat").branch_logits(images, objects, metadata)


def test_a_kept_poster_path_is_the_cnn_networks_own_frozen_and_without_dropout_while_the_corrections_learn():
    """``poster_from``: the poster path is a trained ``cnn`` network's, so a poster without side inputs gets
    exactly its logits, in training (no dropout there) as in scoring; only the side branches get gradients."""
    from posterfusion.jobs.train.loop import fusion_loss

    cnn = model_for("cnn", "residual").eval()
    with torch.no_grad():
        cnn.classifier.bias.add_(0.3)  # "trained": not what a fresh network holds
    kept = model_for("fused", "residual", poster_from="models/cnn-s0")
    kept.keep_poster_path(cnn.state_dict())
    images, objects, metadata = inputs()
    objects, metadata = _absent(objects, metadata, [0])
    kept.train()
    poster, correction = kept(images, objects, metadata, split=True)
    torch.testing.assert_close(poster, cnn(images), rtol=0, atol=0)
    assert correction[0].abs().sum() == 0 and correction[1:].abs().sum() > 0
    fusion_loss(torch.nn.BCEWithLogitsLoss(), poster, correction, torch.ones(3, G)).backward()
    for name, parameter in kept.named_parameters():
        poster_path = name.startswith(("backbone.", "hidden.", "classifier."))
        assert parameter.requires_grad != poster_path and (parameter.grad is None) == poster_path, name
    with torch.no_grad():
        torch.testing.assert_close(kept.eval()(images, objects, metadata)[0], cnn(images)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="poster path"):
        other = build_model(FusionConfig(backbone="keras_cnn", variant="cnn", num_genres=G, hidden=8))
        model_for("fused", "residual", poster_from="x").keep_poster_path(other.state_dict())
    with pytest.raises(ValueError, match="fusion 'residual'"):
        model_for("fused", "concat", poster_from="models/cnn-s0")


def test_object_vectors_are_standardised_with_training_statistics_stored_in_the_weights():
    model = model_for("cnn+objects").eval()
    images, objects, _ = inputs()
    mean, std = objects.mean(0), objects.std(0) + 0.5
    model.set_object_statistics(mean, std)
    state = model.state_dict()
    torch.testing.assert_close(state["object_norm.mean"], mean)
    torch.testing.assert_close(model.object_norm(objects), (objects - mean) / std)
    again = model_for("cnn+objects").eval()
    again.load_state_dict(state)  # a bundle carries them: the Predictor standardises exactly as training did
    torch.testing.assert_close(again(images, objects), model(images, objects))


def test_configs_and_inputs_must_match_the_variant():
    with pytest.raises(ValueError, match="object_dim must be > 0"):
        FusionConfig(variant="cnn+objects", num_genres=G)
    with pytest.raises(ValueError, match="metadata_dim must be > 0"):
        FusionConfig(variant="fused", num_genres=G, object_dim=OBJ)
    FusionConfig(variant="cnn", num_genres=G)  # no side dims needed
    model = model_for("fused")
    images, objects, metadata = inputs()
    with pytest.raises(ValueError, match="needs metadata features"):
        model(images, objects)
    with pytest.raises(ValueError, match="needs objects features"):
        model(images, metadata=metadata)
    with pytest.raises(ValueError, match=r"objects features must have shape \(3, 7\)"):
        model(images, objects[:, :3], metadata)


@pytest.mark.parametrize("fusion", ["concat", "gated", "residual"])
def test_gradients_reach_every_branch(fusion):
    model = model_for("fused", fusion).train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(*inputs()), torch.ones(3, G)).backward()
    branches = [model.object_branch, model.metadata_branch, model.backbone] + ([model.gate] if model.gate else [])
    for branch in branches:
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_frozen_backbone_gets_no_grads_and_stays_in_eval_mode():
    model = model_for("fused", freeze_backbone=True)
    model.train()
    assert model.training and not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert model.object_branch.training
    model(*inputs()).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_frozen_densenet_batchnorm_statistics_do_not_move():
    model = build_model(FusionConfig(backbone="densenet121", variant="cnn", num_genres=G, freeze_backbone=True))
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    after = model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_freeze_bn_keeps_pretrained_batchnorm_statistics_while_the_rest_trains():
    model = build_model(FusionConfig(backbone="mobilenet_v2", variant="cnn", num_genres=G, freeze_bn=True))
    model.train()
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert model.classifier.training and all(p.requires_grad for p in model.backbone.parameters())


def test_a_predictor_build_never_loads_the_starting_weights(tmp_path):
    """A bundle holds every weight: rebuilding from its config must not read (or download) the start."""
    config = FusionConfig(backbone="keras_cnn", weights=str(tmp_path / "gone.safetensors"), variant="cnn",
                          num_genres=G)
    with pytest.raises(FileNotFoundError):
        build_model(config)
    assert build_model(config, load_weights=False)(torch.randn(1, 3, 32, 32)).shape == (1, G)


def test_tf_same_padding_pads_only_after_on_even_inputs():
    from posterfusion.models.backbones import Conv2dSame

    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = conv(image)
    # TF "SAME": output 2×2, window of output (0, 0) covers rows/cols 0..2 (no padding before)
    assert out.shape == (1, 1, 2, 2) and out[0, 0, 0, 0] == image[0, 0, :3, :3].sum()
    assert out[0, 0, 1, 1] == image[0, 0, 2:, 2:].sum()  # the last window runs into one padded row/col


def test_weights_files_are_found_by_name_under_the_weights_folder(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from posterfusion.models.backbones import weights_file, weights_id

    save_file({k: v.contiguous() for k, v in create_backbone("keras_cnn").state_dict().items()},
              str(tmp_path / "mine.safetensors"))
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))
    assert weights_file("mine.safetensors") == tmp_path / "mine.safetensors"
    assert len(weights_id("mine.safetensors")) == 12 and weights_id("none") == "none"
    with pytest.raises(FileNotFoundError, match="POSTERFUSION_WEIGHTS"):
        weights_file("absent.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(("image", "index", "label"), [("cat.jpg", 285, "Egyptian cat"),
                                                       ("grace_hopper.jpg", 652, "military uniform")])
def test_the_pretrained_mobilenet_classifies_the_check_images(image, index, label):
    """../shared/weights/README.md: the ImageNet MobileNetV2, loaded with TF-same padding and [-1, 1] input."""
    import numpy as np
    from PIL import Image

    from posterfusion.models.backbones import imagenet_classifier
    from posterfusion.models.network import input_preset

    from support import SHARED

    weights = SHARED / "weights" / "mobilenet_v2_imagenet.safetensors"
    backbone = create_backbone("mobilenet_v2", str(weights)).eval()
    head = imagenet_classifier(weights)
    pixels = Image.open(SHARED / "weights" / "check" / image).convert("RGB").resize((224, 224),
                                                                                     Image.Resampling.BILINEAR)
    batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None]
    preset = input_preset(FusionConfig(backbone="mobilenet_v2", variant="cnn", num_genres=1, image_size=224))
    with torch.no_grad():
        probabilities = head(backbone(preset(batch))).softmax(1)[0]
    labels = (SHARED / "weights" / "check" / "imagenet_labels.txt").read_text().splitlines()
    assert int(probabilities.argmax()) == index and labels[index + 1] == label  # line 0: TF's background class
    assert float(probabilities[index]) > 0.75


def _members_from_one_checkpoint(config: FusionConfig, trained_stages: int, count: int = 2) -> list[dict]:
    """Members as fine-tuning leaves them: one starting network, each changed only in its last stages and head."""
    torch.manual_seed(0)
    start = build_model(config, load_weights=False).state_dict()
    states = []
    for i in range(count):
        net = build_model(config, load_weights=False)
        net.load_state_dict(start)
        torch.manual_seed(100 + i)
        for stage in net.backbone.stages()[-trained_stages:]:
            for p in stage.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
        for p in net.classifier.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
        states.append(net.state_dict())
    return states


def test_an_ensemble_runs_its_shared_stages_once_and_averages_what_its_members_would_say():
    from posterfusion.models.ensemble import EnsembleNet, ensemble_state, members_shared_stages
    from posterfusion.models.fusion import FusionNet

    config = FusionConfig(backbone="mobilenet_v2", variant="cnn+metadata", num_genres=4, metadata_dim=3)
    states = _members_from_one_checkpoint(config, trained_stages=2)
    shared = members_shared_stages(config, states)
    assert shared == 4  # MobileNetV2's six stages, the last two changed
    ensemble = EnsembleNet(config.model_copy(update={"members": 2, "shared_stages": shared}), load_weights=False)
    ensemble.load_state_dict(ensemble_state(states))
    ensemble.eval()
    images, metadata = torch.randn(3, 3, 64, 64), torch.randn(3, 3)
    alone = []
    for state in states:
        member = FusionNet(config, load_weights=False)
        member.load_state_dict(state)
        alone.append(member.eval())
    calls = []
    hook = ensemble.members[1].backbone.features[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        hidden, logits = ensemble.embed_and_logits(images, None, metadata)
        expected = torch.stack([m(images, None, metadata) for m in alone]).mean(0)
    hook.remove()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not calls  # the second member's copy of the shared stages never ran
    assert hidden.shape == (3, 2 * config.hidden) and config.model_copy(update={"members": 2}).embedding_dim == 512


def test_an_ensemble_weighs_its_members_mean_corrections_as_it_averages_their_logits():
    from posterfusion.models.ensemble import EnsembleNet
    from posterfusion.models.fusion import residual_logits

    config = model_for("fused", "residual").config.model_copy(update={"members": 2})
    ensemble = EnsembleNet(config, load_weights=False).eval()
    images, objects, metadata = inputs()
    with torch.no_grad():
        parts = ensemble.branch_logits(images, objects, metadata)
        torch.testing.assert_close(residual_logits(parts), ensemble(images, objects, metadata))
        scale = {"objects": 0.25, "metadata": 0.0}
        weighed = EnsembleNet(config.model_copy(update={"correction_scale": scale}), load_weights=False).eval()
        weighed.load_state_dict(ensemble.state_dict())
        torch.testing.assert_close(weighed(images, objects, metadata), residual_logits(parts, scale))


def test_an_ensemble_refuses_members_that_differ_where_it_says_they_share():
    from posterfusion.models.ensemble import EnsembleNet, ensemble_state

    config = FusionConfig(backbone="mobilenet_v2", variant="cnn", num_genres=4)
    states = _members_from_one_checkpoint(config, trained_stages=3)  # stage 3 differs too
    ensemble = EnsembleNet(config.model_copy(update={"members": 2, "shared_stages": 4}), load_weights=False)
    with pytest.raises(ValueError, match="differ in backbone stage 3"):
        ensemble.load_state_dict(ensemble_state(states))


def test_a_backbone_split_into_its_stages_gives_its_own_features():
    backbone = create_backbone("mobilenet_v2").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.forward_stages(backbone.forward_stages(x, 0, 3), 3), backbone(x), atol=1e-5)
    with pytest.raises(ValueError, match="cannot run part of its stages"):
        create_backbone("resnet34").forward_stages(x, 0, 2)  # its stages() leave out relu and max-pool


def _routed(routes: dict[str, str]):
    """A routed network of two small networks (side: fused, concat) with a distinct calibration per slice."""
    from posterfusion.models.calibration import Calibration
    from posterfusion.models.fusion import Routing

    side = model_for("fused")
    cnn_config = FusionConfig(backbone="keras_cnn", variant="cnn", num_genres=G, hidden=16)
    calibration = {"with_metadata": Calibration(shift=[0.5] * G, scale=[2.0] * G, bias=[0.1] * G),
                   "without_metadata": Calibration(shift=[-0.2] * G, scale=[0.5] * G, bias=[-1.0] * G)}
    routing = Routing(cnn=cnn_config, presence=PRESENCE["metadata_presence"], routes=routes, calibration=calibration,
                      sources={"cnn": {"bundle": "c", "version": "1"}, "side": {"bundle": "s", "version": "2"}})
    routed = build_model(side.config.model_copy(update={"routing": routing}))
    torch.manual_seed(1)
    cnn = build_model(cnn_config)
    routed.side.load_state_dict(side.state_dict())
    routed.cnn.load_state_dict(cnn.state_dict())
    return routed.eval(), side.eval(), cnn.eval(), calibration


def test_a_routed_network_scores_each_poster_by_its_slices_network_and_calibration():
    """Posters with metadata get the side network's logits under the with-metadata calibration, the others the
    cnn's under theirs — exactly what each network alone says; embeddings are the cnn's for every poster."""
    routed, side, cnn, calibration = _routed({"with_metadata": "side", "without_metadata": "cnn"})
    images, objects, metadata = inputs(4)
    metadata[:, PRESENCE["metadata_presence"]] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        logits = routed(images, objects, metadata)
        hidden, again = routed.embed_and_logits(images, objects, metadata)
        alone = {"side": side(images, objects, metadata), "cnn": cnn(images)}
        expected = torch.empty_like(logits)
        for rows, name, network in (([0, 2], "with_metadata", "side"), ([1, 3], "without_metadata", "cnn")):
            expected[rows] = torch.from_numpy(calibration[name].logits(alone[network][rows].numpy())).float()
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(again, logits)
        torch.testing.assert_close(hidden, cnn.embed(images))
    assert routed.config.embedding_dim == 16 and routed.uses_metadata
    assert set(routed.state_dict()) == {f"side.{k}" for k in side.state_dict()} | {f"cnn.{k}" for k in cnn.state_dict()}


def test_a_routed_network_runs_only_the_networks_its_posters_need():
    routed, *_ = _routed({"with_metadata": "side", "without_metadata": "cnn"})
    images, objects, metadata = inputs(3)
    metadata[:, PRESENCE["metadata_presence"]] = 0.0  # no poster has metadata: the side network is never asked

    def never(*args, **kwargs):
        raise AssertionError("the side network ran for posters routed to the cnn")

    routed.side.forward = never
    with torch.no_grad():
        assert routed(images, objects, metadata).shape == (3, G)
    with pytest.raises(ValueError, match="metadata vector"):
        routed(images, objects, None)


def test_a_routing_names_every_slice_and_a_plain_cnn_of_the_same_input():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="each of"):
        _routed({"with_metadata": "side"})
    routed, *_ = _routed({"with_metadata": "cnn", "without_metadata": "cnn"})
    with pytest.raises(ValidationError, match="same backbone and image size"):
        FusionConfig.model_validate(routed.config.model_dump() | {"image_size": 96})


def test_the_overview_correction_is_its_own_branch_fitted_not_trained_and_nothing_without_a_word():
    """The words' correction: a branch of its own (weighed on validation like the others), no gradient, no bias
    (a poster without an overview word keeps its logits), left out of the training forward (fitted on those
    posters); the metadata branch reads every column but the words."""
    from posterfusion.models.fusion import FusionConfig, FusionNet, fit_text_weights

    dim, span = 12, (2, 8)
    config = FusionConfig(variant="cnn+metadata", fusion="residual", num_genres=3, metadata_dim=dim,
                          metadata_presence=dim - 1, text_span=span, backbone="keras_cnn", image_size=32)
    net = FusionNet(config, load_weights=False).eval()
    assert net.text_correction.bias is None and not net.text_correction.weight.requires_grad
    assert net.metadata_columns.tolist() == [0, 1, 8, 9, 10, 11]
    rng = np.random.default_rng(0)
    words, labels = rng.random((40, 6)) * (rng.random((40, 6)) < 0.4), rng.random((40, 3)) < 0.5
    labels[:, 0] = words[:, 1] > 0.2  # genre 0 follows word 1
    fitted = fit_text_weights(words, labels)
    assert fitted.shape == (3, 6) and fitted[0, 1] == fitted[0].max() > 0
    net.set_text_weights(fitted)
    images, metadata = torch.randn(2, 3, 32, 32), torch.zeros(2, dim)
    metadata[:, dim - 1] = 1.0  # both have metadata; the second an overview word too
    metadata[1, 3] = 1.0
    with torch.no_grad():
        parts = net.branch_logits(images, None, metadata)
        trained, correction = net(images, None, metadata, split=True)
        nothing = net(images, None, torch.zeros(2, dim))
    assert set(parts) == {"poster", "metadata", "text"}
    torch.testing.assert_close(parts["text"][0], torch.zeros(3))
    torch.testing.assert_close(parts["text"][1], torch.as_tensor(fitted[:, 1], dtype=torch.float32))
    torch.testing.assert_close(net(images, None, metadata), parts["poster"] + parts["metadata"] + parts["text"])
    torch.testing.assert_close(trained + correction, parts["poster"] + parts["metadata"])  # training: no words
    torch.testing.assert_close(nothing, parts["poster"])  # no metadata at all: the poster path alone
    with pytest.raises(ValueError, match="text_span"):
        FusionConfig(variant="cnn+metadata", fusion="residual", num_genres=3, metadata_dim=dim,
                     metadata_presence=0, text_span=(4, 20))
