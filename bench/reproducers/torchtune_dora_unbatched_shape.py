"""torchtune DoRALinear returns (1, out_dim) for an unbatched input of shape (in_dim,) (torchtune 0.6.1).

DoRALinear.forward documents "x: input tensor with shape (..., in_dim)", "Returns: output tensor with shape
(..., out_dim)", as nn.Linear and torchtune's own LoRALinear do. It forms mag_norm_scale =
(magnitude / weight_norm).view(1, -1), a (1, out_dim) row, and broadcasts it against base_out; for an
unbatched x of shape (in_dim,) the result gains a leading axis: (1, out_dim), not (out_dim,).

Exit status 1 where the bug is present.
"""

import torch
from torchtune.modules.peft import DoRALinear, LoRALinear

torch.manual_seed(0)
in_dim, out_dim, rank, alpha = 6, 5, 1, 0.75
x = torch.randn(in_dim, dtype=torch.float64)  # one unbatched input vector
shapes = {}
for cls in (torch.nn.Linear, LoRALinear, DoRALinear):
    layer = torch.nn.Linear(in_dim, out_dim) if cls is torch.nn.Linear else cls(in_dim, out_dim, rank=rank, alpha=alpha)
    layer = layer.double().eval()
    if cls is DoRALinear:
        layer.initialize_dora_magnitude()
    with torch.no_grad():
        shapes[cls.__name__] = tuple(layer(x).shape)
    print(f"{cls.__name__:>10}(x of shape {tuple(x.shape)}) -> shape {shapes[cls.__name__]}")
bug = shapes["DoRALinear"] != (out_dim,)
with torch.no_grad():
    batched = layer(x[None])[0]
    same_values = torch.equal(layer(x).reshape(-1), batched)
print(f"DoRALinear values equal those of the batched call x[None]: {same_values} (only the shape is wrong)")
print(
    f"torch {torch.__version__}, torchtune {__import__('torchtune').__version__}: "
    f"{'BUG: an unbatched input gives a (1, out_dim) output' if bug else 'unbatched shape kept'}"
)
raise SystemExit(1 if bug else 0)
