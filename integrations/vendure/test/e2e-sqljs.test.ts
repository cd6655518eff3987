/** The plugin against a real Vendure (sql.js) and the real dispatcher: the main loop and its failures. */
import { after, before, describe, it } from 'node:test';

import { mainLoop, Stack, startStack } from './support/stack';

const BERLIN = { lat: 52.52, lon: 13.405 };

describe('Vendure (sql.js) + dispatcher', { timeout: 600_000 }, () => {
    let stack: Stack;

    before(async () => {
        stack = await startStack({ db: 'sqljs' });
    });

    after(async () => {
        await stack?.stop();
    });

    it('checkout → ready → booked → picked up → delivered ends Delivered with the driver', async () => {
        await mainLoop(stack, BERLIN);
    });
});
