"""File layouts beyond the diffusers folder the core reads.

    single_file.py   sd_xl_base_1.0.safetensors-style files: parts, architecture from shapes
    sgm_keys.py      their tensor names (Stability's sgm / CompVis' ldm) -> minidream's names
    lora_files.py    LoRA files in diffusers, older diffusers and kohya/ComfyUI layouts; loading, fusing them in
    lora_stack.py    several named adapters on a layer (LoRA files): merged, unmerged, removed
    lora_weights.py  moving adapter weights between files and a model's LoRA layers
    model_folder.py  writing a fully fine-tuned model as a diffusers folder
    archives.py      a .zip of class images, checked and unpacked

Importing this package plugs single-file reading into minidream.checkpoint.
"""

from minidream.checkpoint import register_file_reader
from minidream.formats.single_file import SingleFileReader

register_file_reader(SingleFileReader())
