"""Backends of dsa-ref, installed as the package dsa_ref_backends."""
