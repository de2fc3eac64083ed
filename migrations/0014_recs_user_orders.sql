-- RecentlyViewed and UserAffinities read a person's products in the order
-- they answer in (issue 20: per-user reads within 10 ms). Without these,
-- every call sorted all of the person's products, and the bench's heaviest
-- persons have most of the catalog (20,000 products at 10M events: 33 ms a
-- RecentlyViewed at p99). With them a call reads its first rows by index:
-- RecentlyViewed the newest views, UserAffinities the heaviest weights (the
-- pages of its threshold algorithm, storage/_recommendations.py). The keys
-- end with product_id in code point order, the reads' tie-break.
CREATE INDEX recs_user_products_recent
    ON recs_user_products (user_id, view_last DESC, product_id COLLATE "C") WHERE view_n > 0;
CREATE INDEX recs_user_products_weight
    ON recs_user_products (user_id, train_w DESC, product_id COLLATE "C") WHERE train_n > 0;
