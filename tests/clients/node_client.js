// A Node ws client for ringgate's tests (tests/real_clients.rs).
//
// Usage:
//   node_client.js echo URL [--no-compression]       echo text and binary up to 1 MiB, verified
//   node_client.js subscribe URL COUNT [--no-compression]
//                                                    print "ready", then each of COUNT messages
//                                                    received as one line (T:<text> or B:<hex>)
//
// ws offers permessage-deflate by default (client_max_window_bits) and compresses messages of
// 1 KiB and more; --no-compression offers nothing. The first line printed is always
// `extensions: <names>` once connected.
'use strict';
const crypto = require('crypto');
const WebSocket = require('ws');

const [command, url, ...rest] = process.argv.slice(2);
const perMessageDeflate = !rest.includes('--no-compression');

function jsonText(size, seed) {
  const item = `{"seq":${seed},"user":"u${seed % 7}","event":"tick","price":1234.5},`;
  return item.repeat(Math.floor(size / item.length) + 1).slice(0, size);
}

function fail(message) {
  console.log(`error: ${message}`);
  process.exit(1);
}

// wss://: Node's TLS verifies the server against the tests' CA (RINGGATE_TEST_CA).
const ca = url.startsWith('wss://') ? require('fs').readFileSync(process.env.RINGGATE_TEST_CA) : undefined;
const ws = new WebSocket(url, { perMessageDeflate, maxPayload: 2 << 20, ca });
ws.on('error', (e) => fail(String(e)));
setTimeout(() => fail('timed out'), 30000).unref();

ws.on('open', () => {
  console.log(`extensions: ${ws.extensions || 'none'}`);
  if (command === 'echo') {
    echo();
  } else if (command === 'subscribe') {
    subscribe(Number(rest[0]));
  } else {
    fail(`unknown command ${command}`);
  }
});

function echo() {
  const sizes = [0, 1, 125, 126, 200, 4096, 65535, 65536, 300000, 1 << 20];
  const expected = [];
  for (const [i, size] of sizes.entries()) {
    expected.push({ text: jsonText(size, i) });
    expected.push({ binary: Buffer.concat([crypto.randomBytes(size >> 1), Buffer.alloc(size - (size >> 1))]) });
  }
  let next = 0;
  const sendNext = () => {
    const message = expected[next];
    if (message.text !== undefined) ws.send(message.text);
    else ws.send(message.binary);
  };
  ws.on('message', (data, isBinary) => {
    const message = expected[next];
    if (message.text !== undefined) {
      if (isBinary || data.toString('utf8') !== message.text) fail(`text ${next} came back different`);
    } else if (!isBinary || !Buffer.from(data).equals(message.binary)) {
      fail(`binary ${next} came back different`);
    }
    next += 1;
    if (next === expected.length) {
      console.log('echo ok');
      ws.close(1000);
    } else {
      sendNext();
    }
  });
  sendNext();
}

function subscribe(count) {
  console.log('ready');
  let got = 0;
  ws.on('message', (data, isBinary) => {
    console.log(isBinary ? `B:${Buffer.from(data).toString('hex')}` : `T:${data.toString('utf8')}`);
    got += 1;
    if (got === count) ws.close(1000);
  });
}
