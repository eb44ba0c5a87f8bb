"""L3: what is trained on the Transformer backbone (`config.head`), each one `lm.tasks.base.Task`.

  lm          the language model, on token windows or on sentences (`lm.tasks.lm.LMTask`)
  vae         a sentence VAE (`lm.tasks.vae.VAETask`, `lm.models.vae`)
  gan         a text GAN started from an MLE-trained LM or VAE (`lm.tasks.gan.GANTask`, `lm.models.gan`)
  classifier  a sequence classifier on labeled sentences (`lm.tasks.classifier.ClassifierTask`)
  denoise     the language model on corrupted inputs, the VAE's word dropout without a latent (`lm.tasks.denoise`)

A new task is one module here, one line in the registry (`lm.experiment.registry`) and an experiment
config (docs/architecture.md shows the smallest one).
"""
