/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events into the `events` ring buffer (layout: struct flow_event in common.h).
 * Only new connections, their first FIN/RST and drops reach event_emit, so an
 * established packet never touches these maps. event_emit is one out-of-line function
 * shared by every call site, which keeps the programs small.
 */
#ifndef SLUICE_EVENTS_H
#define SLUICE_EVENTS_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "identity.h"
#include "maps.h"
#include "metrics.h"
#include "parse.h"
#include "policy.h"

#define EVENT_NSEC_PER_SEC 1000000000ULL

/* The reader is woken once per EVENT_WAKEUP_EVENTS events of backlog, never per event:
 * a wake-up is an interrupt on this CPU and a context switch of the reader (several
 * microseconds in a VM), and the reader drains the ring every 100 ms anyway, so a wake-up
 * only keeps a fast flow of events from filling the ring between two drains. Waking each
 * time the backlog completes another batch (not on every event above the mark) still
 * wakes a reader that missed an earlier wake-up. 1,024 records are 64 KiB, 1/16 of the
 * ring: at the default rate limit on two CPUs (20,000 events/s) a wake-up every 51 ms at
 * most, against every 3.2 ms with batches of 64. */
#define EVENT_WAKEUP_EVENTS 1024
/* Each record carries the ring's 8-byte header (BPF_RINGBUF_HDR_SZ); 64 bytes in all. */
#define EVENT_RECORD_SIZE (sizeof(struct flow_event) + 8)
#define EVENT_WAKEUP_BYTES (EVENT_WAKEUP_EVENTS * EVENT_RECORD_SIZE)

/* Takes a token from this CPU's bucket, refilled at cfg->rate per second up to
 * cfg->burst. An idle second refills it completely, which keeps the arithmetic in
 * 64 bits for any rate. */
static __always_inline bool event_take_token(const struct event_config *cfg, __u64 now)
{
	__u32 zero = 0;
	struct event_bucket *bucket = bpf_map_lookup_elem(&event_bucket, &zero);
	__u64 elapsed, add;

	if (!bucket)
		return false;
	elapsed = now - bucket->refilled_ns;
	if (elapsed >= EVENT_NSEC_PER_SEC) {
		bucket->tokens = cfg->burst;
		bucket->refilled_ns = now;
	} else {
		add = elapsed * cfg->rate / EVENT_NSEC_PER_SEC;
		if (add) {
			bucket->tokens += add;
			if (bucket->tokens > cfg->burst)
				bucket->tokens = cfg->burst;
			/* Keep the fraction of a token not yet earned. */
			bucket->refilled_ns += add * EVENT_NSEC_PER_SEC / cfg->rate;
		}
	}
	if (!bucket->tokens)
		return false;
	bucket->tokens -= 1;
	return true;
}

/* What a call site knows of its event, packed into one argument: BPF calls pass at
 * most five, in registers, and each call site stays a few instructions. */
#define EVENT_WHAT(type, direction, reason, flags, remote_identity)                         \
	((__u64)(type) | (__u64)(direction) << 8 | (__u64)(reason) << 16 |                  \
	 (__u64)(flags) << 24 | (__u64)(remote_identity) << 32)

/* Fills in @ev, reserved in the ring, for event_emit. Out of line so that the BTF of
 * the object describes struct flow_event (user space checks its mirror there). */
static __noinline void event_fill(struct flow_event *ev, struct __sk_buff *skb,
				  const struct pkt4 *pkt, __u64 what,
				  const struct lb4_service *backend)
{
	__u32 ifindex = pkt->ifindex, own, remote = what >> 32;
	__u8 direction = what >> 8;
	bool egress = direction == METRIC_DIR_EGRESS;
	struct endpoint_info *ep;
	__be32 remote_addr, own_addr;

	*ev = (struct flow_event){
		.time_ns = bpf_ktime_get_ns(),
		.type = what,
		.direction = direction,
		.reason = what >> 16,
		.proto = pkt->proto,
		.tcp_flags = pkt->tcp_flags,
		.flags = what >> 24,
		.ifindex = ifindex,
		.saddr = pkt->saddr,
		.daddr = pkt->daddr,
		.sport = pkt->sport,
		.dport = pkt->dport,
		.len = pkt->len,
	};
	if (backend) {
		ev->flags |= EVENT_F_SERVICE;
		ev->daddr = backend->backend_address;
		ev->dport = backend->backend_port;
		ev->orig_daddr = pkt->daddr;
		ev->orig_dport = pkt->dport;
	}

	ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	own = ep ? ep->identity : 0;
	/* A node device (from_netdev, the tunnel) is no endpoint: its side of the packet
	 * (the backend of an external frontend, the pod a tunnel packet goes to) is named
	 * by the ipcache, like the peer. */
	if (!ep) {
		own_addr = egress ? ev->saddr : ev->daddr;
		own = own_addr ? ipcache_identity(own_addr) : 0;
	}
	if (remote == IDENTITY_UNRESOLVED) {
		remote_addr = egress ? ev->daddr : ev->saddr;
		/* A packet too short to name its peer has no identity to look up. */
		remote = remote_addr ? ipcache_identity(remote_addr) : 0;
	}
	/* Egress packets leave the endpoint, ingress packets enter it. */
	ev->src_identity = egress ? own : remote;
	ev->dst_identity = egress ? remote : own;
}

/* Writes one event on @pkt (as parsed; fields a malformed packet did not reach are 0)
 * at the endpoint pkt->ifindex names, if events are enabled and the rate limit admits
 * it, and counts it as emitted, suppressed or lost. @what is EVENT_WHAT(...); its remote
 * identity is IDENTITY_UNRESOLVED unless the caller looked it up already. @backend,
 * if not NULL, is where a packet sent to a service frontend goes. */
static __noinline int event_emit(struct __sk_buff *skb, const struct pkt4 *pkt, __u64 what,
				 const struct lb4_service *backend)
{
	__u32 zero = 0, index;
	struct event_counter *counter;
	struct event_config *cfg;
	struct flow_event *ev;
	__u64 backlog, wakeup;

	cfg = bpf_map_lookup_elem(&event_config, &zero);
	if (!cfg || !(cfg->flags & EVENT_CONFIG_F_ENABLED))
		return 0;
	index = (__u32)(__u8)what * 2 + ((what >> 8) & 1);
	counter = bpf_map_lookup_elem(&event_counters, &index);
	if (!counter)
		return 0;
	/* Per-CPU slots: no other writer, so plain adds are enough. */
	if (cfg->rate && !event_take_token(cfg, bpf_ktime_get_ns())) {
		counter->suppressed += 1;
		return 0;
	}

	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		counter->lost += 1;
		return 0;
	}
	event_fill(ev, skb, pkt, what, backend);
	/* The backlog counts this record: reserved records are part of it. */
	backlog = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	wakeup = backlog >= EVENT_WAKEUP_BYTES && backlog % EVENT_WAKEUP_BYTES < EVENT_RECORD_SIZE
			 ? BPF_RB_FORCE_WAKEUP
			 : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(ev, wakeup);
	counter->emitted += 1;
	return 0;
}

/* An event on @pkt as it is, untranslated. */
static __always_inline void event_packet(struct __sk_buff *skb, const struct pkt4 *pkt, __u8 type,
					 __u8 direction, __u8 reason, __u8 flags,
					 __u32 remote_identity)
{
	event_emit(skb, pkt, EVENT_WHAT(type, direction, reason, flags, remote_identity), NULL);
}

/* An event on @pkt, sent to a frontend, on its way to @backend. */
static __always_inline void event_service(struct __sk_buff *skb, const struct pkt4 *pkt, __u8 type,
					  __u8 reason, __u8 flags, __u32 remote_identity,
					  const struct lb4_service *backend)
{
	event_emit(skb, pkt,
		   EVENT_WHAT(type, METRIC_DIR_EGRESS, reason, flags, remote_identity), backend);
}

/* Drops @pkt from or to the peer of @remote_identity (IDENTITY_UNRESOLVED: not looked
 * up yet). Counted exactly in `metrics` whatever happens to its event. */
static __always_inline int verdict_drop_from(struct __sk_buff *skb, const struct pkt4 *pkt,
					     __u8 reason, __u8 direction, __u32 remote_identity)
{
	metrics_count(skb, reason, direction);
	event_packet(skb, pkt, EVENT_DROP, direction, reason, 0, remote_identity);
	return TC_ACT_SHOT;
}

static __always_inline int verdict_drop(struct __sk_buff *skb, const struct pkt4 *pkt,
					__u8 reason, __u8 direction)
{
	return verdict_drop_from(skb, pkt, reason, direction, IDENTITY_UNRESOLVED);
}

/* Drops @pkt, sent to a frontend, on its way to @backend. */
static __always_inline int verdict_drop_service(struct __sk_buff *skb, const struct pkt4 *pkt,
						__u8 reason, __u32 remote_identity,
						const struct lb4_service *backend)
{
	metrics_count(skb, reason, METRIC_DIR_EGRESS);
	event_service(skb, pkt, EVENT_DROP, reason, 0, remote_identity, backend);
	return TC_ACT_SHOT;
}

/* EVENT_F_* of the POLICY_VERDICT event for @reason (0: allowed). */
static __always_inline __u8 policy_event_flags(int reason, const struct policy_trace *trace)
{
	if (reason)
		return EVENT_F_DENIED;
	return trace->host_row ? EVENT_F_HOST_ROW : 0;
}

#endif
