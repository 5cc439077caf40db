"""Drop-in namespaces for code written against other libraries.

`from keras_sd.compat import keras_cv` gives `keras_cv.models.StableDiffusion`,
`keras_cv.models.StableDiffusionV2` and `keras_cv.models.stable_diffusion.*` with
KerasCV 0.9's signatures, call forms and outputs, backed by keras-sd's models.
"""
