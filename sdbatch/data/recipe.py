"""Proposed size of sdbatch's built-in demo model (`builtin:shapes`, issue 14), for
`jobs train --config shapes`.

SD v1.x's structure throughout, at sizes that the two constraints of the issue allow:

- The file holds at most 25,000,000 bytes. CLIP's token embedding is vocab (49,408, which the
  SD tokenizer's ids need, end-of-text is 49,407) x width, so the text encoder's width sets a
  floor: 3.16M parameters at width 64. The file is exported in float16 (`export_checkpoint(...,
  dtype=torch.float16)`), as SD checkpoints ship; `load_model` reads it in any dtype.
- Training takes at most 2 hours on the 2-core CPU. On 8x8 latents the U-Net's time goes to the
  number of layers more than to their width (per-op overhead): few blocks, two levels.
  The VAE's time goes to its full-resolution level (64x64), so it is 32 channels wide there
  (GroupNorm's 32 groups set the minimum) with one block per level.

The loader infers every size from the tensor shapes; it assumes SD v1.x's conventions, which
this config follows: 8 U-Net heads at every level, CLIP heads of 64 channels, 4 latent channels.
"""

from sdbatch.model.clip import CLIPConfig
from sdbatch.model.unet import UNetConfig
from sdbatch.model.vae import VAEConfig
from sdbatch.model.weights import ModelConfig

TEXT_WIDTH = 64

SHAPES_CONFIG = ModelConfig(
    # 8x8 and 4x4, a transformer block at both: 4.2M parameters
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    context_dim=TEXT_WIDTH),
    # 64 -> 32 -> 16 -> 8 pixels, 4x8x8 latents: 0.37M parameters
    vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
    # 2 layers, one 64-channel head: 3.27M parameters, 3.16M of them the token embedding
    text_encoder=CLIPConfig(width=TEXT_WIDTH, layers=2, heads=TEXT_WIDTH // 64, mlp_width=4 * TEXT_WIDTH),
)
MAX_FILE_BYTES = 25_000_000
