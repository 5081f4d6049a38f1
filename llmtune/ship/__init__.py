"""Shipping a trained model: serving it over HTTP (export and Hub publishing follow the same room)."""
