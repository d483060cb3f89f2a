"""The network every method shares (ARCHITECTURE.md#packages): modality encoders, Transformer blocks, the
student/teacher encoder, the data2vec 2.0 decoder, the EMA teacher, layer-averaged targets and masking."""
