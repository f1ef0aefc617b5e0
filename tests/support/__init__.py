"""Test-support code: a real registry process, a seeder, a token server and a counting tap."""
