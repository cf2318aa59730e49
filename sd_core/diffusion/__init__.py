"""The model core, in diffusers' own classes: the UNet factory (from-scratch ``UNet2DConditionModel`` or a
pretrained one, whole, attn2-only or LoRA), noise schedulers and samplers, generation through
``StableDiffusionPipeline``, and the export formats."""
