"""The NPU's configuration (docs/npu.md section 1): array size, SRAMs, DMA, vector unit, clock."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

from ...errors import FlexiQError


class NPUConfigError(FlexiQError, ValueError):
    """A bad `npu_config`: unknown key, wrong type or a value the NPU cannot have."""


@dataclass(frozen=True)
class NPUConfig:
    # An edge vision NPU (docs/npu.md section 1): 1024 PEs and 3 MiB of SRAM in all, the range of
    # edge NPUs (a few hundred KiB to a few MiB); the 2 MiB activation SRAM holds the largest
    # working set of a 224x224 MobileNet-class model (a 112x112x96 INT8 tensor and the next
    # layer's output); 32 B/cycle of DRAM bandwidth (32 GB/s at 1 GHz).
    rows: int = 32                   # systolic array rows (output pixels in flight)
    cols: int = 32                   # systolic array columns (output channels in flight)
    ibuf_bytes: int = 256 * 1024     # input (activation tile) SRAM, two banks
    wbuf_bytes: int = 512 * 1024     # weight SRAM, two banks (a layer whose weights fit a bank is loaded once)
    obuf_bytes: int = 256 * 1024     # output / accumulator SRAM (int32), two banks
    abuf_bytes: int = 2048 * 1024    # activation SRAM: layer outputs that stay on chip for their consumers
    dma_bytes_per_cycle: int = 32    # DRAM <-> SRAM bandwidth
    dma_setup_cycles: int = 16       # fixed cost of one DMA descriptor
    sram_bytes_per_cycle: int = 256  # ABUF -> IBUF on-chip mover
    vector_lanes: int = 256          # vector unit (output stage) elements per cycle
    clock_mhz: float = 1000.0
    # 1: when all the weights of a model fit the WBUF they are loaded once, at program load (as an
    # edge NPU preloads a small model), and stay there between inferences; 0: loaded per inference
    resident_weights: int = 1

    _LIMITS = {"rows": (1, 1024), "cols": (1, 1024), "ibuf_bytes": (64, 1 << 30),
               "wbuf_bytes": (64, 1 << 30), "obuf_bytes": (64, 1 << 30), "abuf_bytes": (0, 1 << 30),
               "dma_bytes_per_cycle": (1, 4096), "dma_setup_cycles": (0, 1 << 20),
               "sram_bytes_per_cycle": (1, 1 << 16), "vector_lanes": (1, 4096), "resident_weights": (0, 1)}

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "clock_mhz":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < 1e5):
                    raise NPUConfigError(f"npu_config: clock_mhz must be a number in (0, 100000), got {v!r}")
                continue
            if f.name == "resident_weights" and isinstance(v, bool):
                object.__setattr__(self, f.name, int(v))
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, f.name, int(v))
                    v = int(v)
                else:
                    raise NPUConfigError(f"npu_config: {f.name} must be an integer, got {v!r}")
            lo, hi = self._LIMITS[f.name]
            if not lo <= v <= hi:
                raise NPUConfigError(f"npu_config: {f.name}={v} is outside [{lo}, {hi}]")
        for name in ("ibuf_bytes", "wbuf_bytes", "obuf_bytes"):
            if getattr(self, name) % 8:
                raise NPUConfigError(f"npu_config: {name}={getattr(self, name)} must be a multiple of 8 "
                                     "(two banks of whole int32 words)")
        if self.obuf_bytes // 2 < 4 * self.cols:
            raise NPUConfigError(f"npu_config: obuf_bytes={self.obuf_bytes} cannot hold one row of "
                                 f"{self.cols} int32 accumulators per bank (need >= {8 * self.cols})")

    @property
    def drain_cycles(self) -> int:
        """Shortest pass: the rows x cols accumulators leave through the `vector_lanes`-wide output bus."""
        return -(-self.rows * self.cols // self.vector_lanes)

    @property
    def fill_cycles(self) -> int:
        """Pipeline fill + drain of one GEMM instruction (skewed operands cross the array)."""
        return self.rows + self.cols - 2

    @classmethod
    def from_any(cls, cfg: Optional[Any]) -> "NPUConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, NPUConfig):
            return cfg
        if isinstance(cfg, str):
            import json
            try:
                cfg = json.loads(cfg)
            except ValueError as e:
                raise NPUConfigError(f"npu_config: not valid JSON ({e})") from None
        if not isinstance(cfg, Mapping):
            raise NPUConfigError(f"npu_config must be a dict (or JSON object), got {type(cfg).__name__}")
        known = [f.name for f in fields(cls)]
        aliases = {"array": None}
        kw = {}
        for k, v in cfg.items():
            if k == "array":                       # "array": [rows, cols] or "RxC"
                try:
                    r, c = (v.lower().split("x") if isinstance(v, str) else v)
                    kw["rows"], kw["cols"] = int(r), int(c)
                except (TypeError, ValueError):
                    raise NPUConfigError(f"npu_config: array must be [rows, cols] or 'RxC', got {v!r}") from None
                continue
            if k.endswith("_kb") and k[:-3] + "_bytes" in known:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise NPUConfigError(f"npu_config: {k} must be a number, got {v!r}")
                kw[k[:-3] + "_bytes"] = int(round(float(v) * 1024))
                continue
            if k not in known:
                raise NPUConfigError(f"npu_config: unknown key {k!r} (known: {', '.join(known + ['array'] + [n[:-6] + '_kb' for n in known if n.endswith('_bytes')])})")
            kw[k] = v
        del aliases
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)
