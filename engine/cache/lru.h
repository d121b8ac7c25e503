/* lru.h — the intrusive most-recent-first list the engine's caches (vision, latent) keep
 * their entries on: an entry embeds a dg_lru_node as its first member. */
#ifndef DG_LRU_H
#define DG_LRU_H

#include <stddef.h>

typedef struct dg_lru_node {
    struct dg_lru_node *prev, *next;
} dg_lru_node;

typedef struct {
    dg_lru_node *head, *tail;   /* head: most recently used */
} dg_lru;

static inline void dg_lru_unlink(dg_lru *l, dg_lru_node *n) {
    if (n->prev) n->prev->next = n->next; else l->head = n->next;
    if (n->next) n->next->prev = n->prev; else l->tail = n->prev;
    n->prev = n->next = NULL;
}

static inline void dg_lru_push_front(dg_lru *l, dg_lru_node *n) {
    n->next = l->head;
    n->prev = NULL;
    if (l->head) l->head->prev = n; else l->tail = n;
    l->head = n;
}

/* Marks n most recently used. */
static inline void dg_lru_touch(dg_lru *l, dg_lru_node *n) {
    dg_lru_unlink(l, n);
    dg_lru_push_front(l, n);
}

#endif
