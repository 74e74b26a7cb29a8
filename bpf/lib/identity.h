/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The security identity of a remote address, from the ipcache. */
#ifndef SLUICE_IDENTITY_H
#define SLUICE_IDENTITY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "maps.h"

/* Stands for an identity not looked up yet; never a real one (those fit 24 bits plus
 * the scope byte, and the top scope is unused). */
#define IDENTITY_UNRESOLVED 0xffffffffU

/* The ipcache entry of the longest prefix holding @address, or NULL. */
static __always_inline struct ipcache_entry *ipcache_lookup(__be32 address)
{
	struct ipcache_key key = { .prefixlen = 32, .address = address };

	return bpf_map_lookup_elem(&ipcache, &key);
}

/* The identity of the longest ipcache prefix holding @address. The realizer installs
 * 0.0.0.0/0 as world; a miss (ipcache not written yet) means world too. */
static __always_inline __u32 ipcache_identity(__be32 address)
{
	struct ipcache_entry *entry = ipcache_lookup(address);

	return entry ? entry->identity : IDENTITY_WORLD;
}

#endif
