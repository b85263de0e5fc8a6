"""Pure single-device model code. Imports torch only: never trainer, sharding or data_pipeline."""
