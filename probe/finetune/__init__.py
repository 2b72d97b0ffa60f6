"""Fine-tuning strategies (`probe finetune`, `probe compare`): the full-network side of transfer learning.

    config.py   FinetuneConfig (one field per CLI option)     groups.py   layer groups + optimizer groups
    model.py    backbone + new head, --in-chans surgery       data.py     split, augmentation, loading
    train.py    the loop, checkpoints, resume                 compare.py  strategies under one budget
    plots.py    curves.png, compare.png
"""

from .compare import compare
from .config import AUGMENTS, OPTIMIZERS, STRATEGIES, FinetuneConfig
from .groups import LayerGroup, layer_groups, lr_ladder, param_groups, thawed_count
from .model import FinetuneModel, adapt_first_conv
from .train import finetune, load_finetuned

__all__ = ["AUGMENTS", "OPTIMIZERS", "STRATEGIES", "FinetuneConfig", "FinetuneModel", "LayerGroup",
           "adapt_first_conv", "compare", "finetune", "layer_groups", "load_finetuned", "lr_ladder",
           "param_groups", "thawed_count"]
