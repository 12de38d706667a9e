"""Tests of loka.gate."""
