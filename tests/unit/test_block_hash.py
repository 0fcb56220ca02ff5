import hashlib
import struct

from pdserve.engine.block_hash import block_hashes, hash_block, root_hash


def independent_hashes(tokens, block_size, fingerprint, salt=""):
    """DESIGN.md's definition written out again, as the oracle."""
    parent = hashlib.sha256(b"pdserve/v1" + fingerprint.encode() + struct.pack("<I", block_size)
                            + salt.encode()).digest()
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        parent = hashlib.sha256(parent + b"".join(struct.pack("<I", t) for t in block)).digest()[:16]
        out.append(parent)
    return out


def test_matches_the_design_definition():
    tokens = list(range(1000, 1000 + 50)) + [2**32 - 1]
    assert block_hashes(tokens, 16, "fp") == independent_hashes(tokens, 16, "fp")
    assert len(block_hashes(tokens, 16, "fp")) == 3  # only full blocks


def test_salt_model_and_block_size_separate_chains():
    tokens = list(range(64))
    base = block_hashes(tokens, 16, "fp")
    assert block_hashes(tokens, 16, "fp", cache_salt="tenant-a") != base
    assert block_hashes(tokens, 16, "fp", cache_salt="tenant-a") != block_hashes(tokens, 16, "fp", cache_salt="tenant-b")
    assert block_hashes(tokens, 16, "other") != base
    assert block_hashes(tokens, 32, "fp")[0] not in base


def test_chained_and_incremental():
    tokens = list(range(80))
    full = block_hashes(tokens, 16, "fp")
    # a change in block 0 changes every later hash; a change in block 3 only 3 and 4
    changed = block_hashes([7] + tokens[1:], 16, "fp")
    assert all(a != b for a, b in zip(full, changed))
    later = block_hashes(tokens[:50] + [999] + tokens[51:], 16, "fp")
    assert later[:3] == full[:3] and later[3] != full[3]
    tail = block_hashes(tokens, 16, "fp", parent_hash=full[1], start_block=2)
    assert tail == full[2:]
    assert hash_block(root_hash("fp", 16), tokens[:16]) == full[0]
