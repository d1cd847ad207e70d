"""Proposed size of sdbatch's built-in demo model (`builtin:shapes`, issue 14), for
`jobs train --config shapes`.

SD v1.x's structure throughout, at sizes that the two constraints of the issue allow:

- The file holds at most 25,000,000 bytes. CLIP's token embedding is vocab (49,408, which the
  SD tokenizer's ids need: end-of-text is 49,407) x width, so the text encoder's width sets a
  floor: 3.16M parameters at width 64. With the U-Net and VAE below the whole model is 5.33M
  parameters, 21.3 MB in float32: no float16 export needed.
- Training takes at most 2 hours on the 2-core CPU. This U-Net is the size behind the "about
  1 s per step at batch 32 on 4x8x8 latents" of the reference facts (1.10 s measured here, best
  of 6 on a loaded machine); a 64-channel two-level U-Net with attention at 8x8 (4.2M) took 2.3x
  as long per step, leaving too few steps. The VAE's time goes to its full-resolution level
  (64x64), so it is 32 channels wide there (GroupNorm's 32 groups set the minimum) with one
  block per level; training it on 32x32 crops (it is convolutional) costs a quarter per image.

The loader infers every size from the tensor shapes; it assumes SD v1.x's conventions, which
this config follows: 8 U-Net heads at every level, CLIP heads of 64 channels, 4 latent channels.
"""

from sdbatch.model.clip import CLIPConfig
from sdbatch.model.unet import UNetConfig
from sdbatch.model.vae import VAEConfig
from sdbatch.model.weights import ModelConfig

TEXT_WIDTH = 64

SHAPES_CONFIG = ModelConfig(
    # 8x8 -> 4x4 -> 2x2, transformer blocks at 4x4 and 2x2: 1.69M parameters
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                    context_dim=TEXT_WIDTH),
    # 64 -> 32 -> 16 -> 8 pixels, 4x8x8 latents: 0.37M parameters
    vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
    # 2 layers, one 64-channel head: 3.27M parameters, 3.16M of them the token embedding
    text_encoder=CLIPConfig(width=TEXT_WIDTH, layers=2, heads=TEXT_WIDTH // 64, mlp_width=4 * TEXT_WIDTH),
)
MAX_FILE_BYTES = 25_000_000
