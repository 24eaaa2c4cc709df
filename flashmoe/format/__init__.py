"""The flashmoe model directory (docs/formats.md): manifest, the reader and its checks, the one writer,
group-wise quantisation, safetensors files and atomic writes."""
