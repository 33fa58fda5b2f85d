"""Every floating dtype a safetensors file can hold, in each kind of file minidream reads: LoRA files,
textual-inversion embeddings and model weights. float8 (both kinds), bfloat16, float16 and float64 are
read (float8 widened to float32, which holds every float8 value exactly) and give the same image as
the file's float32 upcast; an integer or bool tensor where weights belong is one error naming it."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_models import write_random_lora
from minidream.formats.lora_files import add_loras, read_lora
from minidream.formats.lora_weights import LoRAFileError
from minidream.formats.loading import CheckpointError
from minidream.methods.textual_inversion import EmbeddingFileError, load_embedding, read_embedding
from minidream.formats.models import BUNDLED_MODEL, load_model
from minidream.pipeline import generate

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / BUNDLED_MODEL
FLOAT_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float64]
NOT_FLOAT = [torch.int32, torch.uint8, torch.bool]
DRAW = dict(steps=3, seed=5, guidance_scale=4.0, progress=False)


def as_dtype(src: Path, dst: Path, dtype, keep=lambda name: False) -> dict:
    """Copy safetensors file src to dst with every tensor (but those `keep` names) stored as dtype;
    returns the float32 upcast of what dst holds."""
    tensors = {k: v if keep(k) else v.to(dtype) for k, v in load_file(str(src)).items()}
    save_file(tensors, str(dst))
    return {k: v if keep(k) else v.float() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def lora32(tmp_path_factory) -> Path:
    """A random LoRA for the bundled model's UNet, stored in float32."""
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    return write_random_lora(path, load_model(TINY).unet)


def image_with_lora(path: Path):
    model = load_model(TINY)
    add_loras(model, [(path, 0.8)])
    return generate(model, ["a photo of rraj person"], **DRAW)[0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_a_lora_file_in_any_float_dtype_samples_as_its_float32_upcast(lora32, tmp_path, dtype):
    stored = tmp_path / "stored.safetensors"
    upcast = as_dtype(lora32, stored, dtype, keep=lambda name: name.endswith("alpha"))
    save_file(upcast, str(tmp_path / "upcast.safetensors"))
    assert read_lora(stored).adapters  # the checks (finiteness included) ran on every tensor
    assert (image_with_lora(stored).tobytes() == image_with_lora(tmp_path / "upcast.safetensors").tobytes())


def test_a_float8_lora_changes_the_image(lora32, tmp_path):
    """The comparison above would hold trivially if the LoRA did nothing."""
    stored = tmp_path / "f8.safetensors"
    as_dtype(lora32, stored, torch.float8_e4m3fn)
    plain = generate(load_model(TINY), ["a photo of rraj person"], **DRAW)[0]
    assert image_with_lora(stored).tobytes() != plain.tobytes()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16], ids=str)
def test_non_finite_values_are_found_in_a_narrow_float_lora(lora32, tmp_path, dtype):
    tensors = load_file(str(lora32))
    first = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoRAFileError, match="NaN or infinite values"):
        read_lora(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("dtype", NOT_FLOAT, ids=str)
def test_an_integer_or_bool_lora_tensor_is_one_error_naming_it(lora32, tmp_path, dtype):
    tensors = load_file(str(lora32))
    first = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[first] = tensors[first].to(dtype)
    save_file(tensors, str(tmp_path / "int.safetensors"))
    with pytest.raises(LoRAFileError, match=f"has a {dtype} down, not floating point") as e:
        read_lora(tmp_path / "int.safetensors")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def embedding32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("emb") / "word.safetensors"
    g = torch.Generator().manual_seed(0)
    model = load_model(TINY)
    widths = [e.get_input_embeddings().weight.shape[1] for e in (model.text.text_encoder, model.text.text_encoder_2)]
    save_file({"clip_l": torch.randn(2, widths[0], generator=g) * 0.02,
               "clip_g": torch.randn(2, widths[1], generator=g) * 0.02}, str(path), metadata={"token": "<w>"})
    return path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_an_embedding_in_any_float_dtype_samples_as_its_float32_upcast(embedding32, tmp_path, dtype):
    stored, upcast = tmp_path / "stored.safetensors", tmp_path / "upcast.safetensors"
    save_file(as_dtype(embedding32, stored, dtype), str(upcast))
    images = []
    for path in (stored, upcast):
        model = load_model(TINY)
        token, n = load_embedding(model.text, path, token="<w>")
        assert n == 2
        images.append(generate(model, ["a photo of <w> <w>_1 person"], **DRAW)[0].tobytes())
    assert images[0] == images[1]


@pytest.mark.parametrize("dtype", NOT_FLOAT, ids=str)
def test_an_integer_or_bool_embedding_is_one_error_naming_it(embedding32, tmp_path, dtype):
    as_dtype(embedding32, tmp_path / "int.safetensors", dtype)
    with pytest.raises(EmbeddingFileError, match=f"vectors are {dtype}"):
        read_embedding(tmp_path / "int.safetensors")


def test_a_non_finite_float8_embedding_is_refused(embedding32, tmp_path):
    tensors = load_file(str(embedding32))
    tensors["clip_l"][0, 0] = float("inf")
    save_file({k: v.to(torch.float8_e5m2) for k, v in tensors.items()}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(EmbeddingFileError, match="NaN or infinite"):
        read_embedding(tmp_path / "inf.safetensors")


def model_with_unet_in(tmp_path: Path, dtype) -> Path:
    folder = tmp_path / f"tiny-{str(dtype).removeprefix('torch.')}"
    shutil.copytree(TINY, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    as_dtype(weights, weights, dtype)
    return folder


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float64], ids=str)
def test_model_weights_in_any_float_dtype_load_as_their_float32_upcast(tmp_path, dtype):
    folder = model_with_unet_in(tmp_path, dtype)
    stored = load_model(folder)
    weights = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in stored.unet.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, weights[name].float()), name
    image = generate(stored, ["a photo of person"], **DRAW)[0]
    assert image.size == generate(load_model(TINY), ["a photo of person"], **DRAW)[0].size


def test_an_integer_model_weight_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "tiny-int"
    shutil.copytree(TINY, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"] = tensors["conv_in.weight"].to(torch.int8)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="conv_in.weight is torch.int8, not torch.float32"):
        load_model(folder)
