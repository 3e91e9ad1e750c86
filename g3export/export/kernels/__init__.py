"""GPU kernels for the custom ops (Triton). Importing this package does not import triton; import
`g3export.export.kernels.attention_triton` for the attention kernels (needs `triton`)."""
