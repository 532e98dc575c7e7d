"""torchtune DoRALinear scales the bias by m / ||W + s B A|| (torchtune 0.6.1, modules/peft/dora.py).

DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) re-scales the adapted weight only:
    y = x (m * V / ||V||)^T + b,   V = W + s B A.
DoRALinear.forward computes base_out = F.linear(x, W, b) (bias included) and returns
    (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * s + base_out,
so the bias is multiplied by m / ||V|| too. torchtune's own merged checkpoint (get_merged_lora_ckpt)
keeps the bias unscaled, so the merged model and the layer disagree.

Case 1 (shrunk): x = 0, m = 0, bias = e_5: the layer must return b; it returns 0.
Case 2: the layer vs nn.Linear(merged weight, same bias) on random data.
Exit status 1 where the bug is present.
"""

import torch
import torch.nn.functional as F
from torchtune.modules.peft import DoRALinear, get_merged_lora_ckpt

torch.manual_seed(0)
in_dim, out_dim, rank, alpha = 8, 6, 2, 4.0
layer = DoRALinear(in_dim, out_dim, rank=rank, alpha=alpha, use_bias=True).double()
with torch.no_grad():
    layer.weight.copy_(torch.randn(out_dim, in_dim, dtype=torch.float64))
    layer.lora_a.weight.copy_(torch.randn(rank, in_dim, dtype=torch.float64))
    layer.lora_b.weight.copy_(torch.randn(out_dim, rank, dtype=torch.float64))
    layer.bias.copy_(torch.nn.functional.one_hot(torch.tensor(5), out_dim).double())
    layer.magnitude.zero_()
layer.eval()

# Case 1: x = 0, m = 0, bias = e_5
x = torch.zeros(1, in_dim, dtype=torch.float64)
with torch.no_grad():
    y = layer(x)
print(f"case 1: x = 0, m = 0, bias = e_5: expected y = bias = {layer.bias.tolist()}")
print(f"        DoRALinear returned                  {y[0].tolist()}")
bug1 = not torch.equal(y[0], layer.bias.detach())

# Case 2: a trained-looking magnitude; the layer vs its own merged checkpoint
with torch.no_grad():
    layer.bias.copy_(torch.randn(out_dim, dtype=torch.float64))
    layer.magnitude.copy_(torch.rand(out_dim, dtype=torch.float64) * 3)
    x = torch.randn(4, in_dim, dtype=torch.float64)
    y_layer = layer(x)
    sd = {f"m.{k}": v.clone() for k, v in layer.state_dict().items()}
    merged = get_merged_lora_ckpt(sd, rank=rank, alpha=alpha)
    y_merged = F.linear(x, merged["m.weight"], merged["m.bias"])
    V = layer.weight + (alpha / rank) * layer.lora_b.weight @ layer.lora_a.weight
    f = layer.magnitude / torch.linalg.norm(V, dim=1)
    y_formula = F.linear(x, f[:, None] * V, layer.bias)  # DoRA eq. 5 with the bias added once
rel = ((y_layer - y_merged).norm() / y_merged.norm()).item()
print(f"case 2: relative difference, layer vs its merged checkpoint: {rel:.3g}")
print(
    f"        layer vs DoRA eq. 5 (bias once): {((y_layer - y_formula).norm() / y_formula.norm()).item():.3g}; "
    f"merged checkpoint vs eq. 5: {((y_merged - y_formula).norm() / y_formula.norm()).item():.3g}"
)
print(
    f"torch {torch.__version__}, torchtune {__import__('torchtune').__version__}: "
    f"{'BUG: the bias is scaled by m/||V||' if bug1 else 'bias handled correctly'}"
)
raise SystemExit(1 if bug1 else 0)
