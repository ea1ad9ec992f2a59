"""Official `kimia_infer.api` namespace; the model class lives in `kimia_infer.api.kimia`."""
