"""Phi-3: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows), RMSNorm, RoPE."""

from . import register
from .base import FamilyAdapter, Proj


@register
class Phi3Adapter(FamilyAdapter):
    family = "phi3"
    model_types = ("phi3",)
    notes = ("qkv_proj rows are [q (heads*head_dim); k (kv*head_dim); v (kv*head_dim)]; gate_up_proj "
             "rows are [gate (intermediate); up (intermediate)].", "Head dims: qk_channel units are RoPE pairs (d, d + head_dim/2); v_channel units are v/o dims.")

    def _qkv(self, i, offset, size):
        base = f"{self.attn(i)}.qkv_proj"
        return Proj(f"{base}.weight", self.opt(f"{base}.bias"), offset=offset, size=size)

    def q(self, i):
        return self._qkv(i, 0, self.layer_heads(i) * self.head_dim)

    def k(self, i):
        return self._qkv(i, self.layer_heads(i) * self.head_dim, self.layer_kv(i) * self.head_dim)

    def v(self, i):
        return self._qkv(i, (self.layer_heads(i) + self.layer_kv(i)) * self.head_dim, self.layer_kv(i) * self.head_dim)

    def ffn_in(self, i):
        base = f"{self.mlp(i)}.gate_up_proj"
        bias = self.opt(f"{base}.bias")
        width = self.layer_ffn(i)
        return [Proj(f"{base}.weight", bias, offset=0, size=width),
                Proj(f"{base}.weight", bias, offset=width, size=width)]
