/**
 * Per seller order: the newest applied webhook sequence and the booked assignment (the atomic guards),
 * and the pending no-driver retry, kept here so that it survives a restart of Vendure.
 */
import { DeepPartial, VendureEntity } from '@vendure/core';
import { Column, Entity, Index } from 'typeorm';

@Entity('dispatcher_delivery_state')
export class DispatcherDeliveryState extends VendureEntity {
    constructor(input?: DeepPartial<DispatcherDeliveryState>) {
        super(input);
    }

    /** The order's code, which is the dispatcher's `sellerOrderId`. */
    @Index({ unique: true })
    @Column({ type: 'varchar', length: 128 })
    sellerOrderId!: string;

    @Column({ type: 'varchar', length: 64 })
    orderId!: string;

    /** Highest `sequence` applied; webhooks at or below it are stale. */
    @Column({ type: 'int', default: 0 })
    sequence!: number;

    /** The assignment whose booking was applied (by the answer or by `delivery.assigned`, once). */
    @Column({ type: 'varchar', length: 64, nullable: true })
    assignmentId!: string | null;

    /** Token of the last writer of a conditional update; lets every database tell who won. */
    @Column({ type: 'varchar', length: 64, default: '' })
    claim!: string;

    /** The dispatch round the pending no-driver retry will start (1 = the first retry). */
    @Column({ type: 'int', default: 0 })
    retryRound!: number;

    /**
     * When the pending retry is due; null when none is pending. A poller that takes the retry moves
     * it forward by a lease instead of clearing it, so a crash before its job is queued delays the
     * retry but never loses it (see NoDriverRetries).
     */
    @Column({ type: Date, nullable: true })
    retryAt!: Date | null;

    /** The webhook-id of the job that took the retry: only that job may run the round. */
    @Column({ type: 'varchar', length: 64, nullable: true })
    retryJob!: string | null;
}
