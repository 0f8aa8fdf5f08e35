"""Export and import: compressed-tensors directories (vLLM), GGUF files (llama.cpp), audits.

    >>> from quantlab.io import export_compressed_tensors, export_gguf, audit
    >>> export_compressed_tensors(quantize_model(model, "w4a16"), "out/", tokenizer=tok)

Only safetensors and GGUF are ever read; nothing is unpickled.
"""

from quantlab.io.audit import AuditReport, LayerAudit, audit, format_audit
from quantlab.io.compressed_tensors import (
    calibrate_input_global_scales,
    export_compressed_tensors,
    read_compressed_tensors,
    vllm_serve_command,
)
from quantlab.io.gguf import export_gguf, read_gguf
from quantlab.io.safetensors_io import read_safetensors, read_safetensors_dir

__all__ = ["AuditReport", "LayerAudit", "audit", "format_audit", "calibrate_input_global_scales",
           "export_compressed_tensors", "read_compressed_tensors", "vllm_serve_command",
           "export_gguf", "read_gguf", "read_safetensors", "read_safetensors_dir"]
