"""Building blocks of the MoE model: RMSNorm, rotary embeddings (default and YaRN), GQA and MLA attention,
dense and MoE MLPs."""
