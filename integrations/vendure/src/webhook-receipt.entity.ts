/** One row per accepted webhook-id: a replayed webhook finds its row and changes nothing. */
import { DeepPartial, VendureEntity } from '@vendure/core';
import { Column, Entity, Index } from 'typeorm';

@Entity('dispatcher_webhook_receipt')
export class DispatcherWebhookReceipt extends VendureEntity {
    constructor(input?: DeepPartial<DispatcherWebhookReceipt>) {
        super(input);
    }

    @Index({ unique: true })
    @Column({ type: 'varchar', length: 200 })
    webhookId!: string;

    @Column({ type: 'varchar', length: 64 })
    claim!: string;

    @Column({ type: 'varchar', length: 64 })
    eventType!: string;
}
